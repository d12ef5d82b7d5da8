"""Expert buffering (expert_cache), routing traces (trace_recorder) and forced routing, on CPU (issue 5)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_runtime.__main__ import build_parser, runtime_config
from moe_runtime.cache_policy import ONLINE_POLICIES, make_policy
from moe_runtime.cache_sim import prefetch_recall, simulate
from moe_runtime.config import ExpertBufferingConfig, GatingConfig, RuntimeConfig, ServingConfig
from moe_runtime.errors import ConfigError
from moe_runtime.expert_cache import Copier, ExpertCache, enable_expert_buffering
from moe_runtime.experts import experts_reference
from moe_runtime.gating import route
from moe_runtime.generate import SamplingParams, generate, prefill
from moe_runtime.model import ModelArgs
from moe_runtime.testing import ServerThread
from moe_runtime.trace_recorder import TraceRecorder
from moe_runtime.traces import Trace, load_trace, synthetic_skewed_trace
from moe_runtime.weights import init_random

# N tokens, L layers, K top-k, E experts

ARGS = ModelArgs.from_name("tiny")  # E=8, top-2, 2 layers
SLOT_COUNTS = range(ARGS.top_k, ARGS.num_experts + 1)
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
# A 9-token prompt makes a prefill step that needs more experts than small pools hold (waves).
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [9], [30, 31, 32, 33]]
ROOT = Path(__file__).resolve().parents[2]


def buffered(slots: int | None = None, policy: str = "lifo", prefetch: bool = True, **config):
    model = init_random(ARGS, seed=0)
    enable_expert_buffering(model, ExpertBufferingConfig(enabled=True, slots_per_layer=slots, policy=policy,
                                                         prefetch=prefetch, **config))
    return model


@pytest.fixture(scope="module")
def resident():
    """The all-resident reference: its generations and the logits of a long prefill."""
    model = init_random(ARGS, seed=0)
    with torch.inference_mode():
        logits = prefill(model, list(range(40)), 0)
    return [c.output_ids for c in generate(model, PROMPTS, GREEDY)], logits


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("slots", SLOT_COUNTS)
@pytest.mark.parametrize("policy", ONLINE_POLICIES)
def test_buffered_outputs_equal_all_resident_for_every_policy_and_slot_count(resident, policy, slots, prefetch):
    model = buffered(slots, policy, prefetch)
    assert [c.output_ids for c in generate(model, PROMPTS, GREEDY)] == resident[0]
    with torch.inference_mode():
        torch.testing.assert_close(prefill(model, list(range(40)), 0), resident[1])
    assert all(moe.w13.numel() == 0 and moe.w2.numel() == 0 for moe in model.moe_blocks)


@pytest.mark.parametrize(("num_experts", "top_k", "slots", "tokens"),
                         [(8, 2, 2, 1), (8, 2, 3, 16), (4, 1, 1, 7), (16, 4, 5, 33), (6, 3, 6, 64)])
@pytest.mark.parametrize("policy", ONLINE_POLICIES)
def test_a_buffered_layer_equals_experts_reference(num_experts, top_k, slots, tokens, policy):
    gen = torch.Generator().manual_seed(num_experts * 100 + tokens)
    hidden, ffn = 32, 48
    w13 = torch.randn(num_experts, 2 * ffn, hidden, generator=gen) / hidden**0.5  # [E, 2F, H]
    w2 = torch.randn(num_experts, hidden, ffn, generator=gen) / ffn**0.5  # [E, H, F]
    masters = [torch.cat([w13[e].reshape(-1), w2[e].reshape(-1)]) for e in range(num_experts)]  # E x [3FH]
    cache = ExpertCache(masters, slots, policy, (ffn, hidden), torch.device("cpu"), Copier(torch.device("cpu")))
    for _ in range(4):  # steps in a row: hits, misses and (T*K > slots) waves
        x = torch.randn(tokens, hidden, generator=gen)  # [T, H]
        routing = route(torch.randn(tokens, num_experts, generator=gen), top_k)
        torch.testing.assert_close(cache.forward(x, routing),
                                   experts_reference(x, w13, w2, routing.topk_weights, routing.topk_ids))
    assert cache.policy.hits + cache.policy.misses > 0


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("policy", ONLINE_POLICIES)
def test_live_counters_equal_a_cache_sim_replay_of_the_trace_recorded_in_the_same_run(policy, prefetch):
    # Batch 1 and a one-token prompt: every step is one token, so cache-sim's batch=1 is the live run.
    model = buffered(3, policy, prefetch)
    recorder = TraceRecorder(model)
    generate(model, [[5]], SamplingParams(max_new_tokens=40, ignore_eos=True))
    live = model.expert_cache_stats()
    predicted = recorder.prefetch_trace()
    assert (predicted is not None) == prefetch
    sim = simulate(recorder.trace(), 3, policy, batch=1, prefetch=predicted.topk_ids if prefetch else None)
    assert live.hits == sim.hits.tolist() and live.misses == sim.misses.tolist()
    assert live.prefetch_loads == sim.prefetch_loads.tolist() and live.evictions == sim.evictions.tolist()
    assert live.copied_bytes == int(sim.loads.sum()) * live.expert_bytes


@pytest.mark.parametrize("policy", ONLINE_POLICIES)
def test_batched_and_prefill_steps_replay_to_the_live_counters(policy):
    # Steps of different sizes (prefills of 9, 1 and 4 tokens, then batches of 3, 2, 1 as prompts end)
    # replay through the same policy class step by step, predictions first as cache-sim orders them.
    model = buffered(2, policy, prefetch=True)
    recorder = TraceRecorder(model)
    generate(model, PROMPTS, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert sum(recorder.step_tokens) == recorder.trace().num_tokens and recorder.step_tokens[:3] == [9, 1, 4]
    live = model.expert_cache_stats()
    assert replay(recorder, policy, 2) == (live.hits, live.misses)


def replay(recorder: TraceRecorder, policy: str, slots: int) -> tuple[list[int], list[int]]:
    """Per-layer (hits, misses) of the recorded steps replayed through fresh pools, predictions first
    in cache-sim's order (every token's first choice, then every token's second)."""
    ids, predicted = recorder.trace().topk_ids, recorder.prefetch_trace()  # [N, L, K]
    hits, misses = [], []
    for layer in range(ids.shape[1]):
        pool, start = make_policy(policy, slots), 0
        for n in recorder.step_tokens:
            if predicted is not None:
                pool.prefetch(predicted.topk_ids[start:start + n, layer].T.reshape(-1).tolist())
            pool.access(ids[start:start + n, layer].reshape(-1).tolist())
            start += n
        hits.append(pool.hits)
        misses.append(pool.misses)
    return hits, misses


@pytest.mark.parametrize("budget_experts", [4, 5, 9, 16, 40])
def test_resident_bytes_never_exceed_the_budget(budget_experts):
    per_expert = ARGS.expert_bytes(torch.float32)
    budget = budget_experts * per_expert + per_expert // 2
    model = buffered(gpu_memory_bytes=budget)
    generate(model, PROMPTS, GREEDY)
    stats = model.expert_cache_stats()
    pools = sum(cache.pool.numel() * cache.pool.element_size() for cache in model.expert_buffering.caches)
    assert stats.resident_bytes == pools <= budget
    assert stats.slots_per_layer == min(budget_experts // ARGS.num_layers, ARGS.num_experts)  # clamped to E


def test_fewer_slots_than_top_k_is_a_config_error_naming_both_numbers():
    with pytest.raises(ConfigError, match=r"slots_per_layer=1 is fewer than top_k=2"):
        buffered(1)
    with pytest.raises(ConfigError, match=r"gpu_memory_bytes=.* holds 1 slot\(s\) per layer.*top_k=2"):
        buffered(gpu_memory_bytes=3 * ARGS.expert_bytes(torch.float32))


def test_buffering_refuses_static_gating_expert_parallelism_and_a_second_enable():
    cfg = ExpertBufferingConfig(enabled=True, slots_per_layer=4)
    static = init_random(ARGS, seed=0, gating=GatingConfig("static", 1.0))
    with pytest.raises(ConfigError, match="dynamic gating"):
        enable_expert_buffering(static, cfg)
    parallel = init_random(ARGS, seed=0)
    parallel.layers[0].moe.parallel = object()
    with pytest.raises(ConfigError, match="expert parallelism"):
        enable_expert_buffering(parallel, cfg)
    with pytest.raises(ConfigError, match="already enabled"):
        enable_expert_buffering(buffered(4), cfg)
    assert enable_expert_buffering(init_random(ARGS), ExpertBufferingConfig()) is None  # disabled: no-op


def test_prefetch_recall_is_reported_and_matches_the_recorded_predictions():
    model = buffered(4, "lru", prefetch=True)
    recorder = TraceRecorder(model)
    generate(model, PROMPTS, GREEDY)
    recall = model.expert_cache_stats().prefetch_recall
    assert 0.0 < recall <= 1.0
    assert recall == pytest.approx(prefetch_recall(recorder.prefetch_trace().topk_ids, recorder.trace().topk_ids))
    assert buffered(4, "lru", prefetch=False).expert_cache_stats().prefetch_recall is None


def test_reconfiguring_the_pools_starts_cold_with_fresh_counters(resident):
    model = buffered(2, "lifo")
    generate(model, PROMPTS, GREEDY)
    model.expert_buffering.configure(5, "lfu", prefetch=False)
    assert model.expert_cache_stats().hits == [0, 0] and model.expert_cache_stats().policy == "lfu"
    assert [c.output_ids for c in generate(model, PROMPTS, GREEDY)] == resident[0]
    with pytest.raises(ConfigError, match="between top_k=2 and num_experts=8"):
        model.expert_buffering.configure(9, "lfu", prefetch=False)


def test_forced_routing_makes_every_layer_use_the_trace_ids_mapped_modulo():
    trace = synthetic_skewed_trace(64, 1, ARGS.num_experts, ARGS.top_k, seed=3)  # one layer, two in the model
    model = init_random(ARGS, seed=0)
    model.force_routing(trace)
    recorder = TraceRecorder(model)
    generate(model, [[5]], SamplingParams(max_new_tokens=20, ignore_eos=True))
    recorded = recorder.trace()
    n = recorded.num_tokens
    for layer in range(ARGS.num_layers):
        np.testing.assert_array_equal(recorded.topk_ids[:, layer], trace.topk_ids[:n, 0])
    np.testing.assert_allclose(recorded.topk_weights, 1.0 / ARGS.top_k)
    model.force_routing(None)
    assert all(moe.forced_routing is None for moe in model.moe_blocks)


def test_forced_routing_replays_trace_weights_and_wraps_at_the_end():
    ids = np.array([[[0, 1]], [[2, 3]], [[4, 5]]])  # [N=3, L=1, K=2]
    weights = np.array([[[0.75, 0.25]], [[0.5, 0.5]], [[0.9, 0.1]]], dtype=np.float32)
    model = init_random(ARGS, seed=0)
    model.force_routing(Trace(ids, weights, ARGS.num_experts))
    recorder = TraceRecorder(model)
    generate(model, [[1, 2]], SamplingParams(max_new_tokens=4, ignore_eos=True))  # 2 + 3 tokens routed
    recorded = recorder.trace()
    np.testing.assert_array_equal(recorded.topk_ids[:, 1], ids[[0, 1, 2, 0, 1], 0])
    np.testing.assert_allclose(recorded.topk_weights[:, 0], weights[[0, 1, 2, 0, 1], 0])


def test_forced_routing_rejects_a_trace_the_model_cannot_replay():
    model = init_random(ARGS, seed=0)
    with pytest.raises(ConfigError, match="12 experts"):
        model.force_routing(synthetic_skewed_trace(8, 2, 12, 2))
    with pytest.raises(ConfigError, match="top_k=3"):
        model.force_routing(synthetic_skewed_trace(8, 2, 8, 3))


def test_buffered_forced_routing_equals_resident_forced_routing():
    trace = synthetic_skewed_trace(64, 3, ARGS.num_experts, ARGS.top_k, seed=1)
    outputs = []
    for model in (init_random(ARGS, seed=0), buffered(3, "lfu")):
        model.force_routing(trace)
        outputs.append([c.output_ids for c in generate(model, PROMPTS, GREEDY)])
    assert outputs[0] == outputs[1]


def test_forced_predictions_drive_prefetch_as_cache_sim_replays_them():
    trace = synthetic_skewed_trace(64, ARGS.num_layers, ARGS.num_experts, ARGS.top_k, seed=2)
    model = buffered(2, "lru", prefetch=True)
    model.force_routing(trace)
    model.expert_buffering.force_predictions(trace)  # an oracle predictor: every needed expert prefetched
    generate(model, [[5]], SamplingParams(max_new_tokens=30, ignore_eos=True))
    live = model.expert_cache_stats()
    assert live.total_misses == 0 and live.prefetch_recall == 1.0
    used = Trace(trace.topk_ids[:30], None, ARGS.num_experts)  # 1 prefill + 29 decode tokens routed
    sim = simulate(used, 2, "lru", prefetch=used.topk_ids)
    assert (live.hits, live.prefetch_loads) == (sim.hits.tolist(), sim.prefetch_loads.tolist())
    model.expert_buffering.configure(3, "lru", prefetch=True)  # forced predictions survive reconfiguring
    assert all(cache.forced_prediction is not None for cache in model.expert_buffering.caches)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moe_runtime", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "runtime"), "PATH": "/usr/bin:/bin"})


def test_cli_generate_buffers_records_a_trace_and_cache_sim_replays_it(tmp_path):
    path = tmp_path / "run.npz"
    proc = _cli("generate", "--prompt-ids", "5", "--max-new-tokens", "16", "--json", "--expert-buffering-slots",
                "3", "--expert-buffering-policy", "lru", "--no-prefetch", "--record-trace", str(path))
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)["expert_cache"]
    trace = load_trace(path)
    assert trace.num_tokens == 16 and not (tmp_path / "run.prefetch.npz").exists()
    sim = _cli("cache-sim", str(path), "--slots", "3", "--policy", "lru", "--json")
    lru = next(r for r in json.loads(sim.stdout)["results"] if r["policy"] == "lru")
    assert (lru["total_hits"], lru["total_misses"]) == (sum(stats["hits"]), sum(stats["misses"]))


def test_cli_rejects_too_few_slots_with_exit_code_2():
    proc = _cli("generate", "--prompt-ids", "5", "--expert-buffering-slots", "1")
    assert proc.returncode == 2 and "slots_per_layer=1 is fewer than top_k=2" in proc.stderr


def test_serve_flags_turn_buffering_on_over_the_yaml_budget(tmp_path):
    yaml_path = tmp_path / "runtime.yaml"
    yaml_path.write_text("expert_buffering: {enabled: false, gpu_memory_bytes: 1000000, policy: lru}\n")
    args = build_parser().parse_args(["serve", "--config", str(yaml_path), "--expert-buffering-slots", "3"])
    cfg = runtime_config(args).expert_buffering
    assert (cfg.enabled, cfg.slots_per_layer, cfg.gpu_memory_bytes, cfg.policy) == (True, 3, None, "lru")
    plain = runtime_config(build_parser().parse_args(["serve"])).expert_buffering
    assert plain == ExpertBufferingConfig()


@pytest.mark.timeout(120)
def test_server_exports_cache_metrics_and_saves_the_trace_on_shutdown(tmp_path):
    serving = ServingConfig(host="127.0.0.1", grpc_port=0, metrics_port=0, admin_port=0)
    config = RuntimeConfig(model="tiny", serving=serving, record_trace=str(tmp_path / "serve.npz"),
                           expert_buffering=ExpertBufferingConfig(enabled=True, slots_per_layer=3))
    with ServerThread(config) as st:
        stats = st.server.serving.engine.model.expert_cache_stats()  # the warm-up request has run
        want = {"hits": stats.total_hits, "misses": stats.total_misses, "copied_bytes": stats.copied_bytes}
        deadline = time.monotonic() + 10
        while True:  # the engine thread updates the counters just after its step
            text = urllib.request.urlopen(f"http://127.0.0.1:{st.server.metrics_port}/metrics").read().decode()
            got = {name: _metric(text, f"moe_runtime_expert_cache_{name}_total") for name in want}
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        recorder = st.server._recorder
    assert got == want
    assert _metric(text, "moe_runtime_expert_cache_stall_seconds_total") > 0
    assert stats.total_hits + stats.total_misses > 0
    saved = load_trace(tmp_path / "serve.npz")
    np.testing.assert_array_equal(saved.topk_ids, recorder.trace().topk_ids)
    assert load_trace(tmp_path / "serve.prefetch.npz").num_tokens == saved.num_tokens
    assert replay(recorder, "lifo", 3) == (stats.hits, stats.misses)


def _metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text format."""
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))
