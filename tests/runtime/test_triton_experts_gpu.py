"""triton_experts on CUDA: experts_gemv in bf16 against the float32 oracle, dropped slots, no host sync,
CUDA-graph replay with new routing, and experts_decode taking it."""

import pytest
import torch

from moe_runtime import triton_experts
from moe_runtime.experts import experts_decode
from moe_runtime.testing import cuda_bf16_case, float32_reference_error
from moe_runtime.triton_experts import experts_gemv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# T tokens, E experts, K top-k, H hidden, F ffn

# (E, H, F): Mixtral-8x7B, DeepSeek-V2-Lite's 64 small experts, and odd sizes that leave partial tiles.
LAYERS = [(8, 4096, 14336), (64, 2048, 1408), (8, 72, 200), (64, 72, 200)]


def _layer_id(layer) -> str:
    return "E{}-H{}-F{}".format(*layer)


def _case(num_tokens, top_k, layer=(8, 256, 512), seed=0):
    case = cuda_bf16_case(num_tokens, top_k, layer, seed)
    if not triton_experts.available(*case[:3]):
        pytest.skip("triton is not importable or the GPU is older than SM80")
    return case


def _assert_close_to_float32_reference(out, x, w13, w2, topk_weights, topk_ids):
    assert out.dtype == torch.bfloat16
    rel = float32_reference_error(out, x, w13, w2, topk_weights, topk_ids)
    assert rel < 1e-2, f"relative error of the norm {rel:.2e}"


@pytest.mark.parametrize("layer", LAYERS, ids=_layer_id)
@pytest.mark.parametrize("top_k", [1, 2, 6])
@pytest.mark.parametrize("num_tokens", [1, 2, 4, 8])
def test_gemv_in_bf16_equals_the_float32_reference(num_tokens, top_k, layer):
    x, w13, w2, topk_weights, topk_ids = _case(num_tokens, top_k, layer)
    _assert_close_to_float32_reference(
        experts_gemv(x, w13, w2, topk_weights, topk_ids), x, w13, w2, topk_weights, topk_ids
    )


@pytest.mark.parametrize("layer", [(8, 72, 200), (8, 256, 512)], ids=_layer_id)
def test_gemv_skips_dropped_slots_and_zeroes_a_token_that_lost_every_slot(layer):
    x, w13, w2, topk_weights, topk_ids = _case(4, 2, layer)
    topk_ids[1, 1] = topk_ids[3] = w13.shape[0]  # id E: dropped by adaptive top-p, weight 0
    topk_weights[1, 1] = topk_weights[3] = 0.0
    out = experts_gemv(x, w13, w2, topk_weights, topk_ids)
    assert not out[3].any()
    _assert_close_to_float32_reference(out, x, w13, w2, topk_weights, topk_ids)


def test_gemv_sums_the_slots_of_tokens_that_share_one_expert():
    x, w13, w2, topk_weights, _ = _case(8, 2)
    topk_ids = torch.tensor([[3, 5]] * 8, device="cuda")  # one lead slot per expert computes all 8 tokens
    _assert_close_to_float32_reference(
        experts_gemv(x, w13, w2, topk_weights, topk_ids), x, w13, w2, topk_weights, topk_ids
    )


@pytest.mark.parametrize("num_tokens", [1, 8])
def test_decode_takes_the_gemv_and_makes_no_host_sync(monkeypatch, num_tokens):
    x, w13, w2, topk_weights, topk_ids = _case(num_tokens, 2)
    calls = []
    monkeypatch.setattr(triton_experts, "experts_gemv", lambda *a: calls.append(1) or experts_gemv(*a))
    experts_decode(x, w13, w2, topk_weights, topk_ids)  # warm-up: compiling is not what we check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = experts_decode(x, w13, w2, topk_weights, topk_ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 2
    _assert_close_to_float32_reference(out, x, w13, w2, topk_weights, topk_ids)


def test_gemv_under_cuda_graph_replays_with_new_routing():
    x, w13, w2, topk_weights, topk_ids = _case(4, 2)
    static = [x.clone(), topk_weights.clone(), topk_ids.clone()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up outside the capture
            experts_gemv(static[0], w13, w2, static[1], static[2])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = experts_gemv(static[0], w13, w2, static[1], static[2])
    for seed in (1, 2):  # fresh tokens and routing, copied into the captured buffers
        new_x, _, _, new_weights, new_ids = _case(4, 2, seed=seed)
        assert not torch.equal(new_ids, topk_ids)
        for buf, value in zip(static, (new_x, new_weights, new_ids)):
            buf.copy_(value)
        graph.replay()
        want = experts_gemv(new_x, w13, w2, new_weights, new_ids)
        torch.testing.assert_close(static_out, want, atol=1e-2, rtol=1e-2)
        _assert_close_to_float32_reference(static_out, new_x, w13, w2, new_weights, new_ids)
