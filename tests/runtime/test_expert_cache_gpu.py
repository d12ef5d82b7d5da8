"""Expert buffering on CUDA (issue 5): bf16 outputs as all-resident, copies on their own stream, prefetch inert."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.cache_sim import simulate
from moe_runtime.config import ExpertBufferingConfig
from moe_runtime.expert_cache import enable_expert_buffering
from moe_runtime.generate import SamplingParams, decode_step, generate, prefill
from moe_runtime.model import ModelArgs
from moe_runtime.trace_recorder import TraceRecorder
from moe_runtime.weights import init_random

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# A small model with aligned shapes, so the all-resident path takes the grouped GEMM on SM90+.
ARGS = ModelArgs(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4,
                 num_kv_heads=2, num_experts=8, top_k=2, max_seq_len=256, rope_theta=10000.0)
PROMPT = list(range(3, 40))
FED = [7, 100, 23, 5, 311, 64, 2, 90, 17, 400, 12, 8]  # teacher-forced decode tokens, the same for every model


def model_on_gpu(slots: int | None = None, policy: str = "lru", prefetch: bool = False):
    model = init_random(ARGS, seed=0, device="cuda", dtype=torch.bfloat16)
    if slots is not None:
        enable_expert_buffering(model, ExpertBufferingConfig(enabled=True, slots_per_layer=slots, policy=policy,
                                                             prefetch=prefetch))
    return model


@torch.inference_mode()
def teacher_forced_logits(model) -> torch.Tensor:
    """Logits [1 + len(FED), V] of the prompt's last position, then of each fed token (eager decode)."""
    rows = [prefill(model, PROMPT, 0)]
    for i, token in enumerate(FED):
        rows.append(decode_step(model, torch.tensor([token], device="cuda"), [len(PROMPT) + i], [0],
                                cuda_graphs=False)[0])
    return torch.stack(rows).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def resident_logits():
    return teacher_forced_logits(model_on_gpu())


@pytest.mark.parametrize("slots", [2, 4, 8])
def test_bf16_buffered_logits_equal_all_resident(resident_logits, slots):
    # Other kernels (per-expert GEMMs against grouped ones), so bf16 rounding, not exact equality.
    logits = teacher_forced_logits(model_on_gpu(slots))
    assert rel_err(logits, resident_logits) < 1e-2
    top2 = resident_logits.topk(2, dim=-1).values  # [rows, 2]
    clear = top2[:, 0] - top2[:, 1] > 0.05  # rows whose greedy token rounding cannot flip
    assert torch.equal(logits.argmax(-1)[clear], resident_logits.argmax(-1)[clear])


def test_copies_run_on_their_own_stream_from_pinned_masters():
    model = model_on_gpu(2)
    buffering = model.expert_buffering
    assert buffering.caches[0].masters[0].is_pinned()
    assert buffering.copier.stream != torch.cuda.current_stream()
    teacher_forced_logits(model)
    stats = model.expert_cache_stats()
    assert stats.copied_bytes > 0 and stats.copy_seconds > 0  # timed by events on the copy stream
    assert stats.resident_bytes == ARGS.num_layers * 2 * ARGS.expert_bytes(torch.bfloat16)
    assert torch.cuda.memory_allocated() > 0 and all(m.w13.numel() == 0 for m in model.moe_blocks)


@pytest.mark.parametrize("policy", ["lifo", "lru"])
def test_prefetch_never_changes_the_outputs(policy):
    plain = teacher_forced_logits(model_on_gpu(3, policy, prefetch=False))
    model = model_on_gpu(3, policy, prefetch=True)
    assert torch.equal(teacher_forced_logits(model), plain)  # the same kernels on the same rows: bitwise
    assert model.expert_cache_stats().prefetch_recall is not None


def test_live_counters_on_gpu_equal_a_cache_sim_replay():
    model = model_on_gpu(3, "lfu", prefetch=True)
    recorder = TraceRecorder(model)
    generate(model, [[5]], SamplingParams(max_new_tokens=24, ignore_eos=True), cuda_graphs=False)
    stats = model.expert_cache_stats()
    sim = simulate(recorder.trace(), 3, "lfu", prefetch=recorder.prefetch_trace().topk_ids)
    assert (stats.hits, stats.misses) == (sim.hits.tolist(), sim.misses.tolist())


def test_decode_graphs_decline_buffered_steps_and_run_them_eager():
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    eager = generate(model_on_gpu(4, prefetch=True), [PROMPT], params, cuda_graphs=False)
    graphed = generate(model_on_gpu(4, prefetch=True), [PROMPT], params, cuda_graphs=True)
    assert graphed[0].output_ids == eager[0].output_ids
