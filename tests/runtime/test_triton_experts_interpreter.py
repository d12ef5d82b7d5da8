"""triton_experts' kernels on CPU under Triton's interpreter, against experts_reference.

Runs only with triton installed and TRITON_INTERPRET=1 (read when the kernels are first jitted), so never
in CI: `TRITON_INTERPRET=1 pytest -m slow tests/runtime/test_triton_experts_interpreter.py`. fp32 and
fp16 only: Triton 3.9's interpreter multiplies bf16 dot operands as their raw bits (the GPU test has bf16).
"""

import os

import pytest
import torch

from moe_runtime.experts import experts_reference
from moe_runtime.gating import route
from moe_runtime.triton_experts import GemvConfig, experts_gemv

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"),
]

# T tokens, E experts, K top-k, H hidden, F ffn

# (T, E, K, H, F): one slot; tokens sharing experts; 48 slots (BLOCK_S 64); 64 experts; odd sizes; H a
# whole number of tiles (no masks along H); F over several split-K programs (SMALL_SPLIT).
SHAPES = [
    (1, 1, 1, 32, 16),
    (1, 8, 2, 72, 200),
    (8, 8, 6, 72, 200),
    (4, 64, 2, 64, 48),
    (8, 8, 2, 33, 19),
    (2, 4, 2, 256, 96),
    (3, 4, 3, 300, 260),
]
SMALL_SPLIT = GemvConfig(block_f=16, block_h=64, block_h2=16, block_f2=32, split_f=64)
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


@pytest.mark.parametrize("config", [GemvConfig(), SMALL_SPLIT], ids=["default", "small-tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_interpreted_gemv_equals_reference(shape, dtype, config):
    x, w13, w2, topk_weights, topk_ids = _case(*shape, dtype)
    out = experts_gemv(x, w13, w2, topk_weights, topk_ids, config)
    _assert_matches_float32_reference(out, x, w13, w2, topk_weights, topk_ids)


def test_interpreted_gemv_skips_dropped_slots():
    x, w13, w2, topk_weights, topk_ids = _case(4, 8, 2, 72, 200, torch.float32)
    topk_ids[1, 1] = topk_ids[3] = 8  # id E: dropped by adaptive top-p, weight 0
    topk_weights[1, 1] = topk_weights[3] = 0.0
    out = experts_gemv(x, w13, w2, topk_weights, topk_ids, SMALL_SPLIT)
    assert not out[3].any()
    _assert_matches_float32_reference(out, x, w13, w2, topk_weights, topk_ids)
