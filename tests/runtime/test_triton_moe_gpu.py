"""triton_moe on CUDA: experts_fused in bf16 against the float32 oracle over T, K, E and odd sizes, dropped
slots, no host sync, CUDA-graph replay with new routing, and run_experts taking it when switched on."""

import pytest
import torch

from moe_runtime import experts, triton_moe
from moe_runtime.experts import run_experts
from moe_runtime.testing import cuda_bf16_case, float32_reference_error
from moe_runtime.triton_moe import MoeTiles, experts_fused

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# T tokens, E experts, K top-k, H hidden, F ffn

# (E, H, F): 8 and 64 experts with odd sizes (partial tiles along every axis), and a 64-expert layer with
# DeepSeek-V2-Lite's expert size (H a whole number of tiles).
LAYERS = [(8, 72, 200), (64, 136, 104), (64, 2048, 1408)]
MIXTRAL = (8, 4096, 14336)


def _layer_id(layer) -> str:
    return "E{}-H{}-F{}".format(*layer)


def _case(num_tokens, top_k, layer=(8, 256, 512), seed=0):
    case = cuda_bf16_case(num_tokens, top_k, layer, seed)
    if not triton_moe.available(*case[:3]):
        pytest.skip("triton is not importable or the GPU is older than SM80")
    return case


def _assert_close_to_float32_reference(out, x, w13, w2, topk_weights, topk_ids):
    assert out.dtype == torch.bfloat16
    rel = float32_reference_error(out, x, w13, w2, topk_weights, topk_ids)
    assert rel < 1e-2, f"relative error of the norm {rel:.2e}"


@pytest.mark.parametrize("layer", LAYERS, ids=_layer_id)
@pytest.mark.parametrize("top_k", [1, 2, 6])
@pytest.mark.parametrize("num_tokens", [9, 64, 333, 512, 2048])
def test_fused_in_bf16_equals_the_float32_reference(num_tokens, top_k, layer):
    x, w13, w2, topk_weights, topk_ids = _case(num_tokens, top_k, layer)
    _assert_close_to_float32_reference(
        experts_fused(x, w13, w2, topk_weights, topk_ids), x, w13, w2, topk_weights, topk_ids
    )


@pytest.mark.parametrize("num_tokens", [64, 512])
def test_fused_at_mixtral_size_equals_the_float32_reference(num_tokens):
    x, w13, w2, topk_weights, topk_ids = _case(num_tokens, 2, MIXTRAL)
    _assert_close_to_float32_reference(
        experts_fused(x, w13, w2, topk_weights, topk_ids), x, w13, w2, topk_weights, topk_ids
    )


@pytest.mark.parametrize("tiles", [bound_tiles[1] for bound_tiles in triton_moe.TILES_BY_SLOTS_PER_EXPERT])
def test_every_tile_row_equals_the_float32_reference(tiles):
    x, w13, w2, topk_weights, topk_ids = _case(333, 2, (8, 72, 200))
    _assert_close_to_float32_reference(
        experts_fused(x, w13, w2, topk_weights, topk_ids, tiles), x, w13, w2, topk_weights, topk_ids
    )


@pytest.mark.parametrize("layer", [(8, 72, 200), (64, 136, 104)], ids=_layer_id)
def test_fused_skips_dropped_slots_and_zeroes_a_token_that_lost_every_slot(layer):
    x, w13, w2, topk_weights, topk_ids = _case(64, 2, layer)
    topk_ids[1, 1] = topk_ids[3] = topk_ids[40:] = w13.shape[0]  # id E: dropped by adaptive top-p, weight 0
    topk_weights[1, 1] = topk_weights[3] = topk_weights[40:] = 0.0
    out = experts_fused(x, w13, w2, topk_weights, topk_ids)
    assert not out[3].any() and not out[40:].any()
    _assert_close_to_float32_reference(out, x, w13, w2, topk_weights, topk_ids)


def test_fused_sums_the_slots_of_tokens_that_all_pick_one_pair_of_experts():
    x, w13, w2, topk_weights, _ = _case(100, 2)
    topk_ids = torch.tensor([[3, 5]] * 100, device="cuda")  # two groups of 100, the rest empty
    _assert_close_to_float32_reference(
        experts_fused(x, w13, w2, topk_weights, topk_ids), x, w13, w2, topk_weights, topk_ids
    )


def test_run_experts_takes_the_fused_path_when_switched_on_and_makes_no_host_sync(monkeypatch):
    x, w13, w2, topk_weights, topk_ids = _case(64, 2)
    calls = []
    monkeypatch.setattr(experts, "FUSED_MOE", True)
    monkeypatch.setattr(triton_moe, "experts_fused", lambda *a: calls.append(1) or experts_fused(*a))
    run_experts(x, w13, w2, topk_weights, topk_ids)  # warm-up: compiling is not what we check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = run_experts(x, w13, w2, topk_weights, topk_ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 2
    _assert_close_to_float32_reference(out, x, w13, w2, topk_weights, topk_ids)


def test_run_experts_keeps_the_grouped_path_while_switched_off(monkeypatch):
    x, w13, w2, topk_weights, topk_ids = _case(64, 2)
    monkeypatch.setattr(experts, "FUSED_MOE", False)
    monkeypatch.setattr(triton_moe, "experts_fused", lambda *a: pytest.fail("switched off"))
    run_experts(x, w13, w2, topk_weights, topk_ids)


@pytest.mark.parametrize("tiles", [None, MoeTiles(64, 64, 128, 64, 4, 4, 3)], ids=["table", "bm64"])
def test_fused_under_cuda_graph_replays_with_new_routing(tiles):
    x, w13, w2, topk_weights, topk_ids = _case(96, 2)
    static = [x.clone(), topk_weights.clone(), topk_ids.clone()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up outside the capture
            experts_fused(static[0], w13, w2, static[1], static[2], tiles)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = experts_fused(static[0], w13, w2, static[1], static[2], tiles)
    for seed in (1, 2):  # fresh tokens and routing, copied into the captured buffers
        new_x, _, _, new_weights, new_ids = _case(96, 2, seed=seed)
        assert not torch.equal(new_ids, topk_ids)
        for buf, value in zip(static, (new_x, new_weights, new_ids)):
            buf.copy_(value)
        graph.replay()
        want = experts_fused(new_x, w13, w2, new_weights, new_ids, tiles)
        torch.testing.assert_close(static_out, want, atol=0, rtol=0)  # deterministic: no atomics
        _assert_close_to_float32_reference(static_out, new_x, w13, w2, new_weights, new_ids)
