"""experts.py on CUDA: bf16 paths against the float32 oracle, no host sync, CUDA-graph capture."""

import pytest
import torch

from moe_runtime import experts, triton_experts
from moe_runtime.experts import (
    experts_decode,
    experts_dynamic,
    experts_reference,
    experts_static,
    run_experts,
)
from moe_runtime.gating import route

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# T tokens, E experts, K top-k, H hidden, F ffn

NUM_EXPERTS, TOP_K = 8, 2


def _hopper() -> bool:
    return torch.cuda.get_device_capability() >= (9, 0)


def _case(num_tokens, hidden=256, ffn=512, seed=0, num_experts=NUM_EXPERTS, top_k=TOP_K):
    """bf16 layer and float32 Mixtral routing on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(num_tokens, hidden, device=dev, generator=gen).to(bf16)  # [T, H]
    w13 = (torch.randn(num_experts, 2 * ffn, hidden, device=dev, generator=gen) / hidden**0.5).to(bf16)
    w2 = (torch.randn(num_experts, hidden, ffn, device=dev, generator=gen) / ffn**0.5).to(bf16)
    routing = route(torch.randn(num_tokens, num_experts, device=dev, generator=gen), top_k)
    return x, w13, w2, routing


def _assert_close_to_float32_reference(out, x, w13, w2, routing):
    want = experts_reference(x.float(), w13.float(), w2.float(), routing.topk_weights, routing.topk_ids)
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    rel = ((out.float() - want).norm() / want.norm()).item()
    assert rel < 1e-2, f"relative error of the norm {rel:.2e}"


PATHS = {
    "dynamic": lambda x, w13, w2, r: experts_dynamic(x, w13, w2, r.topk_weights, r.topk_ids, r.expert_counts),
    "decode": lambda x, w13, w2, r: experts_decode(x, w13, w2, r.topk_weights, r.topk_ids),
    "static": lambda x, w13, w2, r: experts_static(x, w13, w2, r.topk_weights, r.topk_ids, TOP_K)[0],
    "run_experts": lambda x, w13, w2, r: run_experts(x, w13, w2, r.topk_weights, r.topk_ids)[0],
}


@pytest.mark.parametrize("num_tokens", [1, 8, 64, 300])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_path_in_bf16_equals_the_float32_reference(path, num_tokens):
    if path == "decode" and num_tokens > 64:
        pytest.skip("the decode path is for a few token-slots")
    x, w13, w2, routing = _case(num_tokens)
    _assert_close_to_float32_reference(PATHS[path](x, w13, w2, routing), x, w13, w2, routing)


def test_dynamic_with_odd_sizes_takes_the_portable_path_and_equals_the_reference():
    x, w13, w2, routing = _case(50, hidden=200, ffn=100 + 3)
    _assert_close_to_float32_reference(PATHS["dynamic"](x, w13, w2, routing), x, w13, w2, routing)


def test_dynamic_equals_reference_when_some_experts_get_no_tokens():
    x, w13, w2, _ = _case(128)
    logits = torch.randn(128, NUM_EXPERTS, device="cuda")
    logits[:, 3:] = -1e4
    routing = route(logits, TOP_K)
    assert int((routing.expert_counts == 0).sum()) == NUM_EXPERTS - 3
    _assert_close_to_float32_reference(PATHS["dynamic"](x, w13, w2, routing), x, w13, w2, routing)


def test_static_drops_the_same_token_slots_on_gpu_as_on_cpu():
    x, w13, w2, routing = _case(256)
    _, dropped = experts_static(x, w13, w2, routing.topk_weights, routing.topk_ids, 0.1)
    cpu = [t.cpu() for t in (x, w13, w2, routing.topk_weights, routing.topk_ids)]
    _, cpu_dropped = experts_static(*cpu, 0.1)
    assert int(dropped) == int(cpu_dropped) > 0


def _without_host_sync(fn, *args):
    fn(*args)  # warm-up: lazy cuBLAS/allocator initialisation is not what we are checking
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_sync_check_catches_the_portable_paths_host_sync():
    # Odd sizes take the per-expert loop, which reads the counts on the host: the check must see it.
    x, w13, w2, routing = _case(16, hidden=200, ffn=103)
    with pytest.raises(RuntimeError, match="synchroniz"):
        _without_host_sync(PATHS["dynamic"], x, w13, w2, routing)


def _force_gather_or_all_experts(monkeypatch, grouped: bool) -> None:
    """On SM90 decode runs the grouped GEMM; grouped=False checks its other two strategies on CUDA.
    The Triton GEMV that decode takes first is switched off (test_triton_experts_gpu.py covers it)."""
    monkeypatch.setattr(triton_experts, "available", lambda *_: False)
    if not grouped:
        monkeypatch.setattr(experts, "_grouped_mm_usable", lambda *_: False)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 2, 8])
def test_decode_strategies_equal_the_float32_reference(monkeypatch, num_tokens, grouped):
    _force_gather_or_all_experts(monkeypatch, grouped)
    x, w13, w2, routing = _case(num_tokens)
    _assert_close_to_float32_reference(PATHS["decode"](x, w13, w2, routing), x, w13, w2, routing)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 8])
def test_routing_and_decode_make_no_host_sync(monkeypatch, num_tokens, grouped):
    _force_gather_or_all_experts(monkeypatch, grouped)
    x, w13, w2, _ = _case(num_tokens)
    logits = torch.randn(num_tokens, NUM_EXPERTS, device="cuda")

    def step(x, logits):
        routing = route(logits, TOP_K)
        return experts_decode(x, w13, w2, routing.topk_weights, routing.topk_ids)

    _without_host_sync(step, x, logits)


@pytest.mark.skipif(torch.cuda.is_available() and not _hopper(), reason="grouped GEMM path needs SM90+")
@pytest.mark.parametrize("num_tokens", [9, 64, 300])
def test_dynamic_makes_no_host_sync_in_bf16_on_hopper(num_tokens):
    x, w13, w2, routing = _case(num_tokens)
    _without_host_sync(PATHS["dynamic"], x, w13, w2, routing)
    _without_host_sync(lambda *a: experts_dynamic(*a), x, w13, w2, routing.topk_weights, routing.topk_ids)


def _capture(fn, *static_inputs):
    """Warm up on a side stream, then capture fn(*static_inputs) into a graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_inputs)
    return graph, static_out


def _graph_equals_eager(fn, num_tokens):
    x, w13, w2, _ = _case(num_tokens)
    static_x = x.clone()
    static_logits = torch.randn(num_tokens, NUM_EXPERTS, device="cuda")
    graph, static_out = _capture(
        lambda x, logits: fn(x, w13, w2, route(logits, TOP_K)), static_x, static_logits
    )
    for seed in (1, 2):  # replays on fresh inputs, copied into the captured buffers
        new_x, _, _, _ = _case(num_tokens, seed=seed)
        new_logits = torch.randn(num_tokens, NUM_EXPERTS, device="cuda")
        static_x.copy_(new_x)
        static_logits.copy_(new_logits)
        graph.replay()
        want = fn(new_x, w13, w2, route(new_logits, TOP_K))
        torch.testing.assert_close(static_out, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 2, 8])
def test_decode_under_cuda_graph_equals_eager(monkeypatch, num_tokens, grouped):
    _force_gather_or_all_experts(monkeypatch, grouped)
    _graph_equals_eager(PATHS["decode"], num_tokens)


@pytest.mark.skipif(torch.cuda.is_available() and not _hopper(), reason="grouped GEMM path needs SM90+")
def test_dynamic_under_cuda_graph_equals_eager_on_hopper():
    _graph_equals_eager(PATHS["dynamic"], 64)
