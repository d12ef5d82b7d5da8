"""generate.py and the `moe-runtime generate` CLI: batching, sampling, stop tokens, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_runtime.config import GatingConfig
from moe_runtime.errors import InvalidRequest
from moe_runtime.generate import SamplingParams, generate, prefill, prefill_batch, sample
from moe_runtime.model import ModelArgs
from moe_runtime.weights import init_random


@pytest.fixture(scope="module")
def model():
    return init_random(ModelArgs.from_name("tiny"), seed=0)


def test_batched_greedy_equals_each_prompt_alone(model):
    prompts = [[1, 2, 3, 4, 5], [9], [30, 31, 32, 33, 34, 35, 36, 37]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    together = generate(model, prompts, params)
    for prompt, completion in zip(prompts, together):
        (alone,) = generate(model, [prompt], params)
        assert completion.output_ids == alone.output_ids
        assert completion.finish_reason == "length" and len(completion.output_ids) == 12


def test_a_batched_prefill_equals_each_prompt_prefilled_alone(model):
    """Right-padded prompts in one forward: the same last-token logits, the same cache rows up to each
    prompt's end, and the padding is not expert load."""
    prompts, slots = [[1, 2, 3, 4, 5], [9], [30, 31, 32, 33, 34, 35, 36, 37]], [2, 0, 3]
    model.setup_cache(4, 64)
    model.reset_counters()
    together = prefill_batch(model, prompts, slots)
    load = model.expert_load().clone()
    rows = [(layer.attention.kv_cache.k.clone(), layer.attention.kv_cache.v.clone()) for layer in model.layers]
    model.setup_cache(4, 64)
    model.reset_counters()
    alone = torch.stack([prefill(model, p, slot) for p, slot in zip(prompts, slots)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    assert torch.equal(load, model.expert_load())
    assert int(load.sum()) == sum(map(len, prompts)) * model.args.num_layers * model.args.top_k
    for (k, v), layer in zip(rows, model.layers):
        cache = layer.attention.kv_cache
        for p, slot in zip(prompts, slots):
            torch.testing.assert_close(k[slot, : len(p)], cache.k[slot, : len(p)], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[slot, : len(p)], cache.v[slot, : len(p)], atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_for_a_seed_and_varies_without_one(model):
    params = SamplingParams(max_new_tokens=16, temperature=1.5, seed=11, ignore_eos=True)
    a = generate(model, [[7, 8, 9]], params)[0].output_ids
    b = generate(model, [[7, 8, 9]], params)[0].output_ids
    c = generate(model, [[7, 8, 9]], SamplingParams(max_new_tokens=16, temperature=1.5, seed=12,
                                                      ignore_eos=True))[0].output_ids
    assert a == b and a != c


def test_top_p_near_zero_is_greedy():
    logits = torch.randn(4, 50)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    ids = sample(logits, torch.full((4,), 1.0), torch.full((4,), 1e-6), gens)
    assert torch.equal(ids, logits.argmax(-1))


def test_generation_stops_at_a_stop_token(model):
    (free,) = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=8, ignore_eos=True))
    stop_at = free.output_ids[3]
    (stopped,) = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=8, stop_token_ids=(stop_at,),
                                                             ignore_eos=True))
    first = free.output_ids.index(stop_at)
    assert stopped.output_ids == free.output_ids[: first + 1] and stopped.finish_reason == "stop"


@pytest.mark.parametrize(
    ("prompts", "params", "message"),
    [
        ([[]], SamplingParams(), "prompt is empty"),
        ([[1, 2]], SamplingParams(max_new_tokens=0), "max_tokens must be a positive integer"),
        ([[1, 2]], SamplingParams(max_new_tokens=-3), "max_tokens must be a positive integer"),
        ([[1, 10_000]], SamplingParams(), "outside the vocabulary"),
        ([[1] * 500], SamplingParams(max_new_tokens=20), "exceeds the model's context"),
        ([[1]], SamplingParams(top_p=0.0), "top_p"),
        ([], SamplingParams(), "no prompts"),
    ],
)
def test_bad_requests_fail_with_a_clear_message(model, prompts, params, message):
    with pytest.raises(InvalidRequest, match=message):
        generate(model, prompts, params)


def test_static_gating_with_ample_capacity_generates_the_dynamic_tokens():
    dynamic = init_random(ModelArgs.from_name("tiny"), seed=0)
    static = init_random(ModelArgs.from_name("tiny"), seed=0, gating=GatingConfig("static", 2.0))
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6]]
    assert generate(dynamic, prompts, params)[0].output_ids == generate(static, prompts, params)[0].output_ids
    assert int(static.dropped_slots()) == 0


ROOT = Path(__file__).resolve().parents[2]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moe_runtime", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "runtime"), "PATH": "/usr/bin:/bin"})


def test_cli_generate_prints_json_with_ids_and_text():
    proc = _cli("generate", "--model", "tiny", "--prompt", "def f(x):", "--max-new-tokens", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt_ids"] == list(b"def f(x):") and len(out["output_ids"]) <= 5 and "text" in out


def test_cli_static_gating_reports_dropped_slots():
    proc = _cli("generate", "--model", "tiny", "--prompt-ids", "1,2,3,4,5,6,7,8", "--max-new-tokens", "2",
                "--gating", "static", "--capacity-fraction", "0.05", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["dropped_slots"] > 0


def test_cli_rejects_bad_request_with_exit_code_2():
    proc = _cli("generate", "--model", "tiny", "--prompt-ids", "1,2", "--max-new-tokens", "0")
    assert proc.returncode == 2 and "max_tokens must be a positive integer" in proc.stderr
