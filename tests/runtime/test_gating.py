"""gating.route: Mixtral routing semantics, exact per-expert counts, bad top_k."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_runtime.errors import ConfigError
from moe_runtime.gating import RouteOptions, Routing, route

# T tokens, E experts, K top-k, H hidden

CASES = [(1, 1, 1), (5, 4, 1), (7, 4, 2), (16, 4, 3), (1, 8, 2), (33, 8, 2), (64, 8, 3)]  # (T, E, K)


def _logits(num_tokens: int, num_experts: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, num_experts, generator=gen).to(dtype)  # [T, E]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), CASES)
def test_route_matches_softmax_topk_and_renormalisation(num_tokens, num_experts, top_k, dtype):
    logits = _logits(num_tokens, num_experts, dtype)
    routing = route(logits, top_k)

    probs = torch.softmax(logits.float(), dim=-1)
    want_weights, want_ids = torch.topk(probs, top_k, dim=-1)
    want_weights = want_weights / want_weights.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(routing.topk_weights, want_weights)
    torch.testing.assert_close(routing.topk_ids, want_ids)
    assert routing.topk_weights.dtype == torch.float32
    assert routing.topk_ids.dtype == torch.int64
    torch.testing.assert_close(routing.topk_weights.sum(dim=-1), torch.ones(num_tokens))


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), CASES)
def test_route_matches_transformers_mixtral_router(num_tokens, num_experts, top_k):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    config = mixtral.MixtralConfig(
        hidden_size=24, intermediate_size=32, num_local_experts=num_experts, num_experts_per_tok=top_k
    )
    router = mixtral.MixtralTopKRouter(config)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(num_tokens, 24, generator=torch.Generator().manual_seed(2))  # [T, H]

    with torch.no_grad():
        hf_logits, hf_scores, hf_indices = router(hidden)
        routing = route(torch.nn.functional.linear(hidden, router.weight), top_k)

    torch.testing.assert_close(routing.topk_ids, hf_indices)
    torch.testing.assert_close(routing.topk_weights, hf_scores)
    torch.testing.assert_close(route(hf_logits, top_k).topk_weights, hf_scores)


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), CASES)
def test_expert_counts_are_exact_token_slots_per_expert(num_tokens, num_experts, top_k):
    routing = route(_logits(num_tokens, num_experts), top_k)
    want = torch.bincount(routing.topk_ids.reshape(-1), minlength=num_experts).to(torch.int32)
    torch.testing.assert_close(routing.expert_counts, want)
    assert routing.expert_counts.device == routing.topk_ids.device


def test_route_without_renormalize_keeps_the_softmax_probabilities():
    logits = _logits(9, 8)
    routing = route(logits, 2, renormalize=False)
    want, _ = torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1)
    torch.testing.assert_close(routing.topk_weights, want)
    assert bool((routing.topk_weights.sum(dim=-1) < 1).all())


def test_experts_that_no_token_picks_count_zero():
    logits = torch.full((6, 8), -1e4)
    logits[:, 3] = 1.0
    logits[:, 5] = 0.5
    routing = route(logits, 2)
    want = torch.zeros(8, dtype=torch.int32)
    want[3] = want[5] = 6
    torch.testing.assert_close(routing.expert_counts, want)


@pytest.mark.parametrize("top_k", [0, -1, 5, 2.0, True, None])
def test_bad_top_k_is_rejected(top_k):
    with pytest.raises(ValueError, match="top_k"):
        route(_logits(3, 4), top_k)


def test_logits_that_are_not_tokens_by_experts_are_rejected():
    with pytest.raises(ValueError, match="router_logits"):
        route(torch.zeros(2, 3, 4), 1)


def test_routing_is_frozen():
    routing = route(_logits(2, 4), 2)
    assert isinstance(routing, Routing)
    with pytest.raises(AttributeError):
        routing.topk_ids = routing.topk_ids  # type: ignore[misc]


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(1, 40),
    num_experts=st.integers(1, 12),
    top_k=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_route_invariants_hold_for_random_shapes(num_tokens, num_experts, top_k, seed):
    top_k = min(top_k, num_experts)
    routing = route(_logits(num_tokens, num_experts, seed=seed), top_k)
    assert routing.topk_ids.shape == routing.topk_weights.shape == (num_tokens, top_k)
    assert int(routing.expert_counts.sum()) == num_tokens * top_k
    # Each token picks K distinct experts, heaviest first.
    assert all(len(set(row)) == top_k for row in routing.topk_ids.tolist())
    assert bool((routing.topk_weights[:, :-1] >= routing.topk_weights[:, 1:]).all())
    torch.testing.assert_close(routing.topk_weights.sum(dim=-1), torch.ones(num_tokens))


# ---- issue 9: RouteOptions (adaptive top-p, pruned experts, SCMoE's weak routing) ----------------------


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), CASES)
def test_adaptive_top_p_of_one_equals_plain_top_k_exactly(num_tokens, num_experts, top_k):
    logits = _logits(num_tokens, num_experts)
    plain, adaptive = route(logits, top_k), route(logits, top_k, options=RouteOptions(adaptive_top_p=1.0))
    assert torch.equal(adaptive.topk_ids, plain.topk_ids)
    assert torch.equal(adaptive.topk_weights, plain.topk_weights)
    assert torch.equal(adaptive.expert_counts, plain.expert_counts)


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), CASES)
def test_adaptive_top_p_just_below_one_keeps_every_slot(num_tokens, num_experts, top_k):
    # The masking path itself (1.0 skips it): no top-(k-1) mass of these logits reaches 0.9999.
    logits = _logits(num_tokens, num_experts)
    plain, adaptive = route(logits, top_k), route(logits, top_k, options=RouteOptions(adaptive_top_p=0.9999))
    assert torch.equal(adaptive.topk_ids, plain.topk_ids)
    torch.testing.assert_close(adaptive.topk_weights, plain.topk_weights)


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (8, 3), (4, 4)])
def test_adaptive_top_p_keeps_the_fewest_top_slots_whose_router_mass_reaches_p(num_experts, top_k, top_p):
    logits = _logits(64, num_experts, seed=3) * 2  # [T, E], peaked enough that some tokens keep one expert
    routing = route(logits, top_k, options=RouteOptions(adaptive_top_p=top_p))
    probs, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)  # [T, K]
    for t in range(64):
        kept = next(k + 1 for k in range(top_k) if probs[t, : k + 1].sum() >= top_p or k + 1 == top_k)
        assert routing.topk_ids[t, :kept].tolist() == ids[t, :kept].tolist()
        assert routing.topk_ids[t, kept:].tolist() == [num_experts] * (top_k - kept)  # dropped slots
        torch.testing.assert_close(routing.topk_weights[t, :kept], probs[t, :kept] / probs[t, :kept].sum())
        assert not routing.topk_weights[t, kept:].any()
    live = routing.topk_ids[routing.topk_ids < num_experts]
    torch.testing.assert_close(routing.expert_counts, torch.bincount(live, minlength=num_experts).to(torch.int32))
    assert int(routing.expert_counts.sum()) < 64 * top_k or top_p > 0.9  # the threshold saved expert slots


def test_pruned_experts_are_never_routed_to_and_the_rest_route_as_among_themselves():
    logits = _logits(40, 8, seed=5)
    keep = torch.tensor([True, False, True, True, False, True, False, False])
    routing = route(logits, 2, options=RouteOptions(expert_mask=keep))
    assert bool(keep[routing.topk_ids].all())
    assert not routing.expert_counts[~keep].any()
    among = route(logits[:, keep], 2)  # the same routing on a 4-expert router, ids mapped back
    assert torch.equal(routing.topk_ids, keep.nonzero().squeeze(1)[among.topk_ids])
    torch.testing.assert_close(routing.topk_weights, among.topk_weights)


def test_a_mask_that_keeps_every_expert_equals_plain_routing():
    logits = _logits(17, 8)
    masked = route(logits, 2, options=RouteOptions(expert_mask=torch.ones(8, dtype=torch.bool)))
    assert torch.equal(masked.topk_ids, route(logits, 2).topk_ids)
    assert torch.equal(masked.topk_weights, route(logits, 2).topk_weights)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_weak_rank_routes_each_token_to_its_rank_r_expert_alone(rank):
    logits = _logits(25, 8)
    routing = route(logits, 2, options=RouteOptions(weak_rank=rank))
    want = torch.topk(logits, rank, dim=-1).indices[:, rank - 1 :]  # [T, 1]
    assert torch.equal(routing.topk_ids, want)
    assert torch.equal(routing.topk_weights, torch.ones(25, 1))
    assert int(routing.expert_counts.sum()) == 25


@pytest.mark.parametrize("options", [{"adaptive_top_p": 0.0}, {"adaptive_top_p": 1.5}, {"weak_rank": 0},
                                     {"expert_mask": torch.ones(8)}])
def test_bad_route_options_are_rejected(options):
    with pytest.raises(ConfigError):
        RouteOptions(**options)
