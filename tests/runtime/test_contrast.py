"""Self-contrast decoding (SCMoE, issue 9): the formula, a slow reference, the untouched strong cache, batching."""

from __future__ import annotations

import math

import pytest
import torch

from moe_runtime.config import ServingConfig
from moe_runtime.contrast import WEAK_RANK, contrast_logits
from moe_runtime.errors import InvalidRequest
from moe_runtime.gating import RouteOptions
from moe_runtime.generate import SamplingParams, generate
from moe_runtime.model import ModelArgs
from moe_runtime.scheduler import Engine, Request
from moe_runtime.weights import init_random

# B batch, V vocab

PROMPTS = [[1, 2, 3, 4, 5], [60, 61], [7, 9, 11, 13, 15, 17, 19]]


@pytest.fixture(scope="module")
def model():
    return init_random(ModelArgs.from_name("tiny"), seed=0)


def _contrast_by_hand(strong: torch.Tensor, weak: torch.Tensor, alpha: float, beta: float = 0.1) -> torch.Tensor:
    s, w = torch.log_softmax(strong.double(), -1), torch.log_softmax(weak.double(), -1)
    scores = (1 + alpha) * s - alpha * w
    scores[s.exp() < beta * s.exp().max(dim=-1, keepdim=True).values] = -math.inf
    return scores


def test_contrast_logits_is_the_plausibility_masked_contrast():
    gen = torch.Generator().manual_seed(0)
    strong, weak = torch.randn(3, 50, generator=gen) * 3, torch.randn(3, 50, generator=gen) * 3
    for alpha in (0.0, 0.5, 2.0):
        got = contrast_logits(strong, weak, alpha).double()
        want = _contrast_by_hand(strong, weak, alpha)
        assert torch.equal(got.isinf(), want.isinf())
        torch.testing.assert_close(got[~got.isinf()], want[~want.isinf()], atol=1e-4, rtol=1e-5)
    per_row = contrast_logits(strong, weak, torch.tensor([0.0, 0.5, 2.0]))
    torch.testing.assert_close(per_row[2], contrast_logits(strong[2:], weak[2:], 2.0)[0])


def _reference_generate(prompt: list[int], n: int, alpha: float) -> list[int]:
    """The slow oracle: no KV cache reuse, every step recomputes the whole sequence twice on a fresh model,
    once with plain routing and once with every MoE block on the weak routing."""
    ref = init_random(ModelArgs.from_name("tiny"), seed=0)
    seq = list(prompt)
    for _ in range(n):
        tokens, pos = torch.tensor([seq]), torch.arange(len(seq))[None]
        ref.setup_cache(1, len(seq))
        with torch.no_grad():
            strong = ref(tokens, pos, kv_len=len(seq))[0, -1]
            for moe in ref.moe_blocks:
                moe.route_options = RouteOptions(weak_rank=WEAK_RANK)
            weak = ref(tokens, pos, kv_len=len(seq))[0, -1]
            for moe in ref.moe_blocks:
                moe.route_options = None
        seq.append(int(_contrast_by_hand(strong[None], weak[None], alpha).argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_contrast_decoding_equals_the_uncached_reference(model, alpha):
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, contrast_alpha=alpha)
    got = generate(model, PROMPTS, params)
    for prompt, completion in zip(PROMPTS, got):
        assert completion.output_ids == _reference_generate(prompt, 10, alpha)


def test_contrast_changes_the_greedy_tokens_and_alpha_zero_does_not(model):
    plain = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True))
    zero = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True, contrast_alpha=0.0))
    strong = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True, contrast_alpha=2.0))
    assert [c.output_ids for c in zero] == [c.output_ids for c in plain]
    assert [c.output_ids for c in strong] != [c.output_ids for c in plain]


def test_the_weak_pass_leaves_the_strong_kv_cache_as_a_plain_prefill_writes_it(model):
    prompt = PROMPTS[2]
    (completion,) = generate(model, [prompt], SamplingParams(max_new_tokens=8, ignore_eos=True, contrast_alpha=1.0))
    seq = prompt + completion.output_ids[:-1]  # every token the model was fed
    got = [(layer.attention.kv_cache.k[0, : len(seq)].clone(), layer.attention.kv_cache.v[0, : len(seq)].clone())
           for layer in model.layers]
    ref = init_random(ModelArgs.from_name("tiny"), seed=0)
    ref.setup_cache(1, len(seq))
    with torch.no_grad():
        ref(torch.tensor([seq]), torch.arange(len(seq))[None], kv_len=len(seq))
    for (k, v), layer in zip(got, ref.layers):
        torch.testing.assert_close(k, layer.attention.kv_cache.k[0, : len(seq)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, layer.attention.kv_cache.v[0, : len(seq)], atol=1e-5, rtol=1e-5)


def test_the_engine_contrasts_only_the_requests_that_ask(model):
    alphas = [1.0, 0.0, 0.5]
    want = [generate(model, [p], SamplingParams(max_new_tokens=9, ignore_eos=True, contrast_alpha=a))[0].output_ids
            for p, a in zip(PROMPTS, alphas)]
    engine = Engine(model, ServingConfig(max_running_sequences=4))
    outputs: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    finished: list[int] = []
    for i, (prompt, alpha) in enumerate(zip(PROMPTS, alphas)):
        params = SamplingParams(max_new_tokens=9, ignore_eos=True, contrast_alpha=alpha)
        engine.submit(Request(prompt, params, lambda ev, i=i: (outputs[i].extend(ev.token_ids),
                                                               ev.finish_reason and finished.append(i))))
    while len(finished) < len(PROMPTS):
        engine.step()
    assert [outputs[i] for i in range(len(PROMPTS))] == want


@pytest.mark.parametrize("alpha", [-0.5, math.nan, math.inf])
def test_bad_contrast_alpha_is_rejected(model, alpha):
    with pytest.raises(InvalidRequest, match="contrast_alpha"):
        generate(model, [[1, 2]], SamplingParams(contrast_alpha=alpha))


def test_contrast_is_refused_under_a_forced_routing(model):
    from moe_runtime.traces import synthetic_skewed_trace

    model.force_routing(synthetic_skewed_trace(16, 2, 8, 2))
    try:
        with pytest.raises(InvalidRequest, match="forced routing"):
            generate(model, [[1, 2]], SamplingParams(contrast_alpha=1.0))
    finally:
        model.force_routing(None)
