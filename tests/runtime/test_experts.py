"""experts.py: every path against experts_reference(), static gating's GShard-order dropping, dispatch."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_runtime import experts
from moe_runtime.experts import (
    DECODE_MAX_SLOTS,
    experts_decode,
    experts_dynamic,
    experts_reference,
    experts_static,
    run_experts,
)
from moe_runtime.gating import RouteOptions, route

# T tokens, E experts, K top-k, H hidden, F ffn

# (T, E, K, H, F): T=1, E=1, every K, odd sizes (portable loop) and 16-byte aligned ones (grouped GEMM).
SHAPES = [
    (1, 1, 1, 32, 16),
    (1, 8, 2, 64, 32),
    (3, 4, 1, 33, 19),
    (5, 4, 2, 32, 16),
    (7, 4, 3, 33, 19),
    (16, 8, 2, 64, 48),
    (37, 8, 3, 48, 40),
    (64, 8, 1, 33, 19),
]
DTYPES = [torch.float32, torch.bfloat16]


def _tolerance(dtype: torch.dtype) -> dict:
    # bf16 paths round intermediates at different points than the oracle (one ulp is 2**-8 relative).
    return {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}


def _case(num_tokens, num_experts, top_k, hidden, ffn, dtype=torch.float32, seed=0, active_experts=None):
    """Random layer and Mixtral routing; only the first `active_experts` experts can be picked."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)  # [T, H]
    w13 = (torch.randn(num_experts, 2 * ffn, hidden, generator=gen) / hidden**0.5).to(dtype)  # [E, 2F, H]
    w2 = (torch.randn(num_experts, hidden, ffn, generator=gen) / ffn**0.5).to(dtype)  # [E, H, F]
    logits = torch.randn(num_tokens, num_experts, generator=gen)  # [T, E]
    if active_experts is not None:
        logits[:, active_experts:] = -1e4
    routing = route(logits, top_k)
    return x, w13, w2, routing


def _assert_matches_reference(out, x, w13, w2, routing):
    want = experts_reference(x, w13, w2, routing.topk_weights, routing.topk_ids)
    assert out.shape == want.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, want, **_tolerance(x.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dynamic_equals_reference(shape, dtype):
    x, w13, w2, routing = _case(*shape, dtype=dtype)
    out = experts_dynamic(x, w13, w2, routing.topk_weights, routing.topk_ids, routing.expert_counts)
    _assert_matches_reference(out, x, w13, w2, routing)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_ffn", [(64, 32), (33, 19)])
def test_dynamic_equals_reference_when_some_experts_get_no_tokens(hidden_ffn, dtype):
    x, w13, w2, routing = _case(20, 8, 2, *hidden_ffn, dtype=dtype, active_experts=3)
    assert int((routing.expert_counts == 0).sum()) == 5
    out = experts_dynamic(x, w13, w2, routing.topk_weights, routing.topk_ids)
    _assert_matches_reference(out, x, w13, w2, routing)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_portable_loop_equals_reference_for_aligned_shapes(monkeypatch, dtype):
    # Aligned shapes take the grouped GEMM on CPU; force the per-expert loop to check it too.
    monkeypatch.setattr(experts, "_grouped_mm_usable", lambda *_: False)
    x, w13, w2, routing = _case(24, 8, 2, 64, 32, dtype=dtype, active_experts=5)
    out = experts_dynamic(x, w13, w2, routing.topk_weights, routing.topk_ids)
    _assert_matches_reference(out, x, w13, w2, routing)


def test_grouped_gemm_is_taken_only_for_16_byte_aligned_rows():
    x, w13, w2, _ = _case(4, 4, 2, 64, 32)
    assert experts._grouped_mm_usable(x, w13, w2) == hasattr(torch, "_grouped_mm")
    x, w13, w2, _ = _case(4, 4, 2, 33, 19)
    assert not experts._grouped_mm_usable(x, w13, w2)
    x, w13, w2, _ = _case(4, 4, 2, 64, 32, dtype=torch.float16)
    assert not experts._grouped_mm_usable(x, w13, w2)


DECODE_SHAPES = [
    (1, 8, 1, 64, 32),  # 1 slot of 8 experts: per-slot gather without the grouped GEMM
    (1, 8, 2, 33, 19),  # 2 slots: per-slot gather
    (2, 8, 2, 64, 32),  # 4 slots: all experts read once
    (8, 8, 2, 64, 32),  # 16 slots, the dynamic path's decode limit
    (1, 1, 1, 32, 16),
    (3, 4, 3, 33, 19),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_equals_reference(shape, dtype):
    x, w13, w2, routing = _case(*shape, dtype=dtype)
    out = experts_decode(x, w13, w2, routing.topk_weights, routing.topk_ids)
    _assert_matches_reference(out, x, w13, w2, routing)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_without_grouped_gemm_equals_reference(monkeypatch, shape, dtype):
    # Aligned shapes take the grouped GEMM on CPU; force the gather / all-experts paths to check them too.
    monkeypatch.setattr(experts, "_grouped_mm_usable", lambda *_: False)
    x, w13, w2, routing = _case(*shape, dtype=dtype)
    out = experts_decode(x, w13, w2, routing.topk_weights, routing.topk_ids)
    _assert_matches_reference(out, x, w13, w2, routing)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_static_with_room_for_every_slot_equals_reference_and_drops_nothing(shape, dtype):
    x, w13, w2, routing = _case(*shape, dtype=dtype)
    top_k = shape[2]
    out, dropped = experts_static(x, w13, w2, routing.topk_weights, routing.topk_ids, capacity_fraction=top_k)
    _assert_matches_reference(out, x, w13, w2, routing)
    assert dropped.dtype == torch.int64 and dropped.dim() == 0 and int(dropped) == 0


def _gshard_kept(topk_ids: list[list[int]], num_experts: int, capacity: int) -> list[list[bool]]:
    """Slot 0 of every token in token order fills each expert's buffer first, then slot 1, ..."""
    filled = [0] * num_experts
    kept = [[False] * len(row) for row in topk_ids]
    for k in range(len(topk_ids[0])):
        for t, row in enumerate(topk_ids):
            kept[t][k] = filled[row[k]] < capacity
            filled[row[k]] += 1
    return kept


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity_fraction", [0.05, 0.15, 0.25])
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k"), [(24, 4, 1), (40, 4, 2), (33, 8, 2), (50, 8, 3)]
)
def test_static_with_small_capacity_drops_exactly_the_gshard_overflow(
    num_tokens, num_experts, top_k, capacity_fraction, dtype
):
    x, w13, w2, routing = _case(num_tokens, num_experts, top_k, 32, 16, dtype=dtype, seed=3)
    out, dropped = experts_static(x, w13, w2, routing.topk_weights, routing.topk_ids, capacity_fraction)

    capacity = max(1, math.ceil(capacity_fraction * num_tokens))
    kept = torch.tensor(_gshard_kept(routing.topk_ids.tolist(), num_experts, capacity))  # [T, K]
    assert int(dropped) == int((~kept).sum()) > 0
    # fairseq renormalises the kept weights per token; a token that lost every slot gets zeros.
    weights = routing.topk_weights * kept
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
    want = experts_reference(x, w13, w2, weights, routing.topk_ids)
    torch.testing.assert_close(out, want, **_tolerance(dtype))


def test_token_that_loses_every_slot_gets_zero_output():
    # One expert, capacity 1: only token 0 fits, the other tokens are dropped whole.
    x, w13, w2, routing = _case(4, 1, 1, 32, 16)
    out, dropped = experts_static(x, w13, w2, routing.topk_weights, routing.topk_ids, capacity_fraction=0.25)
    assert int(dropped) == 3
    torch.testing.assert_close(out[1:], torch.zeros(3, 32))
    torch.testing.assert_close(
        out[:1], experts_reference(x[:1], w13, w2, routing.topk_weights[:1], routing.topk_ids[:1])
    )


@pytest.mark.parametrize("capacity_fraction", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_capacity_fraction_is_rejected(capacity_fraction):
    x, w13, w2, routing = _case(4, 4, 2, 32, 16)
    with pytest.raises(ValueError, match="capacity_fraction"):
        experts_static(x, w13, w2, routing.topk_weights, routing.topk_ids, capacity_fraction)


def _spy_on_paths(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name in ("experts_decode", "experts_dynamic", "experts_static"):
        real = getattr(experts, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(experts, name, spy)
    return calls


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "want_path"),
    [
        (1, 2, "experts_decode"),
        (8, 2, "experts_decode"),
        (9, 2, "experts_dynamic"),
        (16, 1, "experts_decode"),
    ],
)
def test_run_experts_takes_decode_path_up_to_the_slot_limit(monkeypatch, num_tokens, top_k, want_path):
    calls = _spy_on_paths(monkeypatch)
    x, w13, w2, routing = _case(num_tokens, 8, top_k, 32, 16)
    out, dropped = run_experts(x, w13, w2, routing.topk_weights, routing.topk_ids)
    assert calls[0] == want_path and dropped is None  # decode may go on through experts_dynamic
    assert (num_tokens * top_k <= DECODE_MAX_SLOTS) == (want_path == "experts_decode")
    _assert_matches_reference(out, x, w13, w2, routing)


def test_run_experts_static_returns_the_dropped_count(monkeypatch):
    calls = _spy_on_paths(monkeypatch)
    x, w13, w2, routing = _case(32, 4, 2, 32, 16)
    out, dropped = run_experts(
        x, w13, w2, routing.topk_weights, routing.topk_ids, gating="static", capacity_fraction=0.25
    )
    want_out, want_dropped = experts_static(x, w13, w2, routing.topk_weights, routing.topk_ids, 0.25)
    assert calls[0] == "experts_static"
    torch.testing.assert_close(out, want_out)
    assert int(dropped) == int(want_dropped) > 0


@pytest.mark.parametrize("gating", ["Dynamic", "capacity", ""])
def test_bad_gating_name_is_rejected(gating):
    x, w13, w2, routing = _case(2, 4, 2, 32, 16)
    with pytest.raises(ValueError, match="'dynamic', 'static'"):
        run_experts(x, w13, w2, routing.topk_weights, routing.topk_ids, gating=gating)


@pytest.mark.parametrize(
    "path", [experts_reference, experts_dynamic, experts_decode, lambda *a: experts_static(*a, 1.0)]
)
def test_mismatched_shapes_are_rejected(path):
    x, w13, w2, routing = _case(4, 4, 2, 32, 16)
    with pytest.raises(ValueError):
        path(x[:, :31], w13, w2, routing.topk_weights, routing.topk_ids)
    with pytest.raises(ValueError):
        path(x, w13, w2[:, :, :15], routing.topk_weights, routing.topk_ids)
    with pytest.raises(ValueError):
        path(x, w13, w2, routing.topk_weights[:3], routing.topk_ids[:3])


@settings(max_examples=30, deadline=None)
@given(
    num_tokens=st.integers(1, 24),
    num_experts=st.integers(1, 8),
    top_k=st.integers(1, 3),
    hidden_ffn=st.sampled_from([(8, 4), (16, 8), (33, 19), (12, 20)]),
    active=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_every_path_equals_reference_for_random_small_shapes(
    num_tokens, num_experts, top_k, hidden_ffn, active, seed
):
    top_k = min(top_k, num_experts)
    active = max(top_k, min(active, num_experts))
    x, w13, w2, routing = _case(num_tokens, num_experts, top_k, *hidden_ffn, seed=seed, active_experts=active)
    args = (x, w13, w2, routing.topk_weights, routing.topk_ids)
    want = experts_reference(*args)
    torch.testing.assert_close(experts_dynamic(*args), want, **_tolerance(x.dtype))
    torch.testing.assert_close(experts_decode(*args), want, **_tolerance(x.dtype))
    out, dropped = experts_static(*args, capacity_fraction=1.0)
    torch.testing.assert_close(out, want, **_tolerance(x.dtype))
    assert int(dropped) == 0


# ---- issue 9: dropped slots (id E) from adaptive top-p routing ---------------------------------------


def _adaptive_case(shape, dtype, top_p=0.6):
    """_case's layer with adaptive top-p routing: some slots are dropped (id E, weight 0)."""
    x, w13, w2, _ = _case(*shape, dtype=dtype)
    logits = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(7)) * 2  # [T, E]
    logits[0, 0] += 10  # token 0 is sure of expert 0: it keeps that one alone
    routing = route(logits, shape[2], options=RouteOptions(adaptive_top_p=top_p))
    assert bool((routing.topk_ids == shape[1]).any())
    return x, w13, w2, routing


def _kept_only_reference(x, w13, w2, routing):
    """The oracle on the kept slots alone: dropped slots moved to expert 0 with weight 0."""
    num_experts = w13.shape[0]
    ids = torch.where(routing.topk_ids < num_experts, routing.topk_ids, 0)
    return experts_reference(x, w13, w2, routing.topk_weights, ids)


ADAPTIVE_SHAPES = [s for s in SHAPES + DECODE_SHAPES if s[2] >= 2]


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADAPTIVE_SHAPES)
def test_every_path_skips_dropped_slots(monkeypatch, shape, dtype, grouped):
    if not grouped:
        monkeypatch.setattr(experts, "_grouped_mm_usable", lambda *_: False)
    x, w13, w2, routing = _adaptive_case(shape, dtype)
    want = _kept_only_reference(x, w13, w2, routing)
    args = (x, w13, w2, routing.topk_weights, routing.topk_ids)
    torch.testing.assert_close(experts_reference(*args), want, **_tolerance(dtype))
    torch.testing.assert_close(experts_dynamic(*args, routing.expert_counts), want, **_tolerance(dtype))
    torch.testing.assert_close(experts_dynamic(*args), want, **_tolerance(dtype))
    torch.testing.assert_close(experts_decode(*args), want, **_tolerance(dtype))
    out, dropped = experts_static(*args, capacity_fraction=shape[2])
    torch.testing.assert_close(out, want, **_tolerance(dtype))
    assert int(dropped) == 0  # adaptive drops are not capacity drops


def test_dropped_slots_take_no_static_capacity():
    # One expert, capacity for exactly the kept slots: nothing overflows because dropped slots queue nowhere.
    x, w13, w2, _ = _case(8, 2, 2, 32, 16)
    ids = torch.tensor([[0, 2]] * 8)  # slot 1 dropped everywhere
    weights = torch.tensor([[1.0, 0.0]] * 8)
    out, dropped = experts_static(x, w13, w2, weights, ids, capacity_fraction=1.0)
    assert int(dropped) == 0
    torch.testing.assert_close(out, experts_reference(x, w13, w2, weights, ids))
