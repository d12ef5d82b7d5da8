"""triton_moe's kernels on CPU under Triton's interpreter, against experts_reference.

Runs only with triton installed and TRITON_INTERPRET=1 (read when the kernels are first jitted), so never
in CI: `TRITON_INTERPRET=1 pytest -m slow tests/runtime/test_triton_moe_interpreter.py`. fp32 and fp16
only: Triton 3.9's interpreter multiplies bf16 dot operands as their raw bits (the GPU test has bf16).
"""

import os

import pytest
import torch

from moe_runtime.experts import experts_reference
from moe_runtime.gating import route
from moe_runtime.triton_moe import MoeTiles, experts_fused

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"),
]

# T tokens, E experts, K top-k, H hidden, F ffn

# (T, E, K, H, F): odd sizes (partial tiles on every axis); top-1; top-6 of 16 (many groups, some
# empty); H and F whole numbers of tiles (no masks along K); several M-blocks per expert; 60 slots per
# expert (the table's BM 128 row).
SHAPES = [
    (9, 8, 2, 72, 40),
    (5, 4, 1, 33, 19),
    (6, 16, 6, 32, 24),
    (4, 4, 2, 64, 32),
    (40, 4, 2, 32, 16),
    (120, 2, 1, 32, 16),
]
SMALL = MoeTiles(16, 16, 16, 16, 2, 4, 2)  # several programs along every axis, GROUP_M over a partial group
TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 2e-2, "rtol": 2e-2}}


def _case(num_tokens, num_experts, top_k, hidden, ffn, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)  # [T, H]
    w13 = torch.randn(num_experts, 2 * ffn, hidden, generator=gen) / hidden**0.5  # [E, 2F, H]
    w2 = torch.randn(num_experts, hidden, ffn, generator=gen) / ffn**0.5  # [E, H, F]
    routing = route(torch.randn(num_tokens, num_experts, generator=gen), top_k)
    return x.to(dtype), w13.to(dtype), w2.to(dtype), routing.topk_weights, routing.topk_ids


def _assert_matches_float32_reference(out, x, w13, w2, topk_weights, topk_ids):
    want = experts_reference(x.float(), w13.float(), w2.float(), topk_weights, topk_ids)
    assert out.dtype == x.dtype and out.shape == want.shape
    torch.testing.assert_close(out.float(), want, **TOLERANCE[x.dtype])


@pytest.mark.parametrize("tiles", [None, SMALL], ids=["table", "small-tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_interpreted_fused_moe_equals_reference(shape, dtype, tiles):
    x, w13, w2, topk_weights, topk_ids = _case(*shape, dtype)
    out = experts_fused(x, w13, w2, topk_weights, topk_ids, tiles)
    _assert_matches_float32_reference(out, x, w13, w2, topk_weights, topk_ids)


def test_interpreted_fused_moe_skips_dropped_slots():
    x, w13, w2, topk_weights, topk_ids = _case(9, 8, 2, 72, 40, torch.float32)
    topk_ids[1, 1] = topk_ids[3] = 8  # id E: dropped by adaptive top-p, weight 0
    topk_weights[1, 1] = topk_weights[3] = 0.0
    out = experts_fused(x, w13, w2, topk_weights, topk_ids, SMALL)
    assert not out[3].any()
    _assert_matches_float32_reference(out, x, w13, w2, topk_weights, topk_ids)
