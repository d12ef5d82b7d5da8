"""Expert FFN paths: [dispatch] -> [expert FFN] -> [combine] for one MoE layer, given the routing.

Owns the dynamic-gating path (the paper's contribution: exact counts, no capacity, nothing dropped), a
decode path for a few token-slots (static shapes, CUDA-graph capturable), the fairseq static-gating
baseline, and experts_reference(), the slow oracle every path is tested against. It neither routes
(gating.py) nor moves weights between host and GPU (expert_cache.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moe_runtime import triton_experts, triton_moe

# T tokens, E experts, K top-k, H hidden, F ffn; S = T*K token-slots, C capacity (static gating only).
# A slot with id E is dropped (gating's adaptive top-p, issue 9): weight 0, never dispatched nor counted.
# Weights are in nn.Linear layout: w13 [E, 2F, H] = cat(w1, w3) along dim 1 (HF gate_up_proj), w2 [E, H, F].

DECODE_MAX_SLOTS: int = 16  # T*K at or below this uses experts_decode on the dynamic path

# The Triton fused MoE (triton_moe.py) for DECODE_MAX_SLOTS < T*K <= FUSED_MOE_MAX_SLOTS on CUDA bf16/fp16
# with triton, in place of experts_dynamic's grouped GEMMs + SiLU + index_add. On an H100 (Mixtral shape,
# bench/results/triton_moe.md) it is faster up to T=1024 at top-2 (T=64 1.03 vs 1.16 ms, T=512 1.29 vs
# 1.76, T=1024 1.88 vs 1.99) and slower from T=2048 (3.26 vs 3.16), where the grouped GEMMs run near the
# GEMM rate: hence the range. One switch for the process, not per call.
FUSED_MOE: bool = True
FUSED_MOE_MAX_SLOTS: int = 2048

# The decode path's per-slot gather moves about this many expert-sizes of bytes per token-slot: read the
# expert, write its gathered copy, read the copy in bmm. Reading every expert once is cheaper beyond it.
_GATHER_BYTES_PER_SLOT = 3


def experts_reference(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """The oracle: a plain loop over experts, each on the tokens routed to it. Slow; syncs the host."""
    _check_inputs(x, w13, w2, topk_weights, topk_ids)
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    out = torch.zeros_like(x)  # [T, H]
    for e in range(w13.shape[0]):
        token_idx, slot_idx = torch.where(topk_ids == e)  # [n], [n]
        if token_idx.numel() == 0:
            continue
        y = _ffn(x[token_idx], w13[e], w2[e])  # [n, H]
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot_idx, None].to(x.dtype))
    return out


def experts_dynamic(x, w13, w2, topk_weights, topk_ids, expert_counts=None) -> torch.Tensor:
    """Dynamic gating: sort the T*K token-slots by expert, run each expert on exactly its rows, scatter back.

    expert_counts [E] int32 (from gating.route) saves recounting. No capacity, no padding, nothing
    dropped. On CUDA SM90+ in bf16 and on CPU (aligned shapes) one grouped GEMM per projection with
    offsets on the device: no host sync there. Elsewhere a per-expert loop that syncs once.
    """
    _check_inputs(x, w13, w2, topk_weights, topk_ids)
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    top_k, num_experts = topk_ids.shape[1], w13.shape[0]
    flat_ids = topk_ids.reshape(-1)  # [S]
    # Stable, so rows of one expert stay in token order (deterministic, and the same order as the oracle).
    order = torch.argsort(flat_ids, stable=True)  # [S] slot index of each sorted row
    token_of_row = order // top_k  # [S]
    if expert_counts is None:
        expert_counts = _count_slots(flat_ids, num_experts)  # [E] int32
    xs = x[token_of_row]  # [S, H] gathered, grouped by expert
    if _grouped_mm_usable(x, w13, w2):
        ys = _ffn_grouped(xs, w13, w2, expert_counts)  # [S, H]
    else:
        ys = _ffn_per_expert(xs, w13, w2, expert_counts)  # [S, H]
    # Dropped slots (id E) sort after every expert's rows, where no FFN ran: their rows hold garbage.
    ran = flat_ids[order, None] < num_experts  # [S, 1]
    ys = torch.where(ran, ys * topk_weights.reshape(-1)[order, None].to(x.dtype), 0)  # [S, H]
    return torch.zeros_like(x).index_add_(0, token_of_row, ys)  # [T, H]


def experts_decode(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """Few token-slots: static shapes, no host sync, so a decode step can be CUDA-graph captured.

    Reads only the active experts' weights. On CUDA with triton (SM80+, bf16/fp16) and at most
    triton_experts.GEMV_MAX_SLOTS slots, two fused Triton GEMV kernels (issue 8). Otherwise, where the
    grouped GEMM runs (SM90+ bf16, aligned CPU) the dynamic path itself: groups of zero rows are skipped,
    so each chosen expert is read once and nothing is copied (H100, Mixtral shape, T=1: 0.38 ms against
    0.87 ms for the gather below). Elsewhere a per-slot gather and bmm (gpt-fast's decode) while that
    moves fewer bytes than reading every expert once; past that (T*K >= E/3) one GEMM over all experts.
    """
    _check_inputs(x, w13, w2, topk_weights, topk_ids)
    if topk_ids.numel() <= triton_experts.GEMV_MAX_SLOTS and triton_experts.available(x, w13, w2):
        return triton_experts.experts_gemv(x, w13, w2, topk_weights, topk_ids)
    if _grouped_mm_usable(x, w13, w2):
        return experts_dynamic(x, w13, w2, topk_weights, topk_ids)
    if _GATHER_BYTES_PER_SLOT * topk_ids.numel() < w13.shape[0]:
        return _decode_gathered(x, w13, w2, topk_weights, topk_ids)
    return _decode_all_experts(x, w13, w2, topk_weights, topk_ids)


def experts_static(
    x, w13, w2, topk_weights, topk_ids, capacity_fraction: float, capacity_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static gating, the paper's baseline: fairseq's inference path (moe branch, top2gate.py and
    moe_layer.py), top-2 generalised to top-K.

    Capacity C = ceil(capacity_fraction * T) per expert; token-slots past it are dropped (GShard order:
    slot 0 of every token first). Kept weights are renormalised per token after dropping, as fairseq's
    default (normalize_gate_prob_before_dropping=False); so with renormalize=False routing this differs
    from the other paths even when nothing drops. Returns (out [T, H], dropped token-slots, 0-dim int64).
    capacity_tokens: the token count C is taken from (default T); under expert parallelism, a rank's
    padded shard size, as fairseq pads every worker's tokens to one length (parallel_static.py).
    """
    _check_inputs(x, w13, w2, topk_weights, topk_ids)
    if not (math.isfinite(capacity_fraction) and capacity_fraction > 0):
        raise ValueError(f"capacity_fraction must be a positive number, got {capacity_fraction!r}")
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    capacity = static_capacity(capacity_fraction, x.shape[0] if capacity_tokens is None else capacity_tokens)
    combine_weights, dispatch_mask, dropped = _static_plan(topk_weights, topk_ids, w13.shape[0], capacity)
    # Dense one-hot dispatch and combine (fairseq's einsums "sec,sm->ecm" / "sec,ecm->sm"): O(T*E*C*H),
    # quadratic in T, which is the baseline's cost the paper measures.
    dispatched = torch.einsum("tec,th->ech", dispatch_mask.to(x.dtype), x)  # [E, C, H]
    h = torch.bmm(dispatched, w13.transpose(1, 2))  # [E, C, 2F]; empty slots are zero placeholders
    y = torch.bmm(_silu_mul(h), w2.transpose(1, 2))  # [E, C, H]
    out = torch.einsum("tec,ech->th", combine_weights.to(x.dtype), y)  # [T, H]
    return out, dropped


def static_capacity(capacity_fraction: float, tokens: int) -> int:
    """C = ceil(f * T) token-slots per expert, at least 1."""
    return max(1, math.ceil(capacity_fraction * tokens))


def run_experts(
    x,
    w13,
    w2,
    topk_weights,
    topk_ids,
    *,
    gating: str = "dynamic",
    capacity_fraction: float = 1.0,
    expert_counts=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick the expert path: (out [T, H], dropped token-slots for static gating else None).

    Dynamic: experts_decode up to DECODE_MAX_SLOTS slots, then triton_moe where FUSED_MOE says so, else
    experts_dynamic."""
    if gating == "dynamic":
        # T*K is a shape, so the choice costs no sync and is fixed for a captured graph.
        if topk_ids.numel() <= DECODE_MAX_SLOTS:
            return experts_decode(x, w13, w2, topk_weights, topk_ids), None
        if _fused_moe_takes(x, w13, w2, topk_ids):
            _check_inputs(x, w13, w2, topk_weights, topk_ids)
            return triton_moe.experts_fused(x, w13, w2, topk_weights, topk_ids), None
        return experts_dynamic(x, w13, w2, topk_weights, topk_ids, expert_counts), None
    if gating == "static":
        return experts_static(x, w13, w2, topk_weights, topk_ids, capacity_fraction)
    raise ValueError(f"gating must be one of 'dynamic', 'static', got {gating!r}")


def _fused_moe_takes(x, w13, w2, topk_ids) -> bool:
    """Whether run_experts hands the dynamic path to triton_moe: switched on, T*K in range, and runnable."""
    in_range = DECODE_MAX_SLOTS < topk_ids.numel() <= FUSED_MOE_MAX_SLOTS
    return FUSED_MOE and in_range and triton_moe.available(x, w13, w2)


def _check_inputs(x, w13, w2, topk_weights, topk_ids) -> None:
    """Shapes only: checking the id range would read the ids on the host."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"want x [T, H], w13 [E, 2F, H], w2 [E, H, F]; got {tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    num_experts, two_ffn, hidden = w13.shape
    if hidden != x.shape[1] or two_ffn % 2 or w2.shape != (num_experts, hidden, two_ffn // 2):
        raise ValueError(
            f"inconsistent shapes: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"want topk_ids and topk_weights [T={x.shape[0]}, K]; got {tuple(topk_ids.shape)}, {tuple(topk_weights.shape)}"
        )


def _silu_mul(h: torch.Tensor) -> torch.Tensor:
    """[..., 2F] -> [..., F]: SiLU(h @ w1) * (h @ w3), the halves in w13's cat(w1, w3) order."""
    ffn = h.shape[-1] // 2
    return F.silu(h[..., :ffn]) * h[..., ffn:]


def _ffn(rows: torch.Tensor, w13_e: torch.Tensor, w2_e: torch.Tensor) -> torch.Tensor:
    """One expert on its rows [n, H] -> [n, H]."""
    return F.linear(_silu_mul(F.linear(rows, w13_e)), w2_e)


def _count_slots(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[S] -> [E] int32 by a scatter-add of ones (torch.bincount would sync the host on CUDA); dropped
    slots (id E) land in a spare last bin that is cut off."""
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat_ids.device)
    return counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))[:num_experts]


def _grouped_mm_usable(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes a real grouped kernel here (see runtime-anchors section 1.2)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        # Only the SM90+ bf16 CUTLASS kernel reads offs on the device; other CUDA cases fall back inside
        # torch to a host-synced loop over groups, no better than ours.
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    # Every operand needs a 16-byte aligned base and 16-byte multiple non-unit strides: rows of x and
    # w13 are H long, rows of the SiLU output and w2 are F long (odd sizes such as H=33 fail).
    elem = x.element_size()
    hidden, ffn = w13.shape[2], w2.shape[2]
    return (
        w13.is_contiguous()
        and w2.is_contiguous()
        and (hidden * elem) % 16 == 0
        and (ffn * elem) % 16 == 0
        and w13.data_ptr() % 16 == 0
        and w2.data_ptr() % 16 == 0
    )


def _ffn_grouped(xs, w13, w2, expert_counts) -> torch.Tensor:
    """[S, H] rows grouped by expert -> [S, H] with two grouped GEMMs; offsets never leave the device."""
    offs = torch.cumsum(expert_counts, dim=0, dtype=torch.int32)  # [E] end row of each expert
    # Transposed views of the nn.Linear-layout weights, column-major as the kernel accepts: no copy.
    h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)  # [S, 2F]
    return torch._grouped_mm(_silu_mul(h), w2.transpose(-2, -1), offs=offs)  # [S, H]


def _ffn_per_expert(xs, w13, w2, expert_counts) -> torch.Tensor:
    """Portable path: the same grouped FFN as a loop over experts with at least one row."""
    ys = torch.empty_like(xs)  # [S, H]
    start = 0
    for e, n in enumerate(expert_counts.tolist()):  # host sync: portable path only
        if n:
            ys[start : start + n] = _ffn(xs[start : start + n], w13[e], w2[e])
        start += n
    return ys


def _decode_gathered(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """One weight copy per token-slot, then bmm: reads only the chosen experts (gpt-fast's decode)."""
    num_tokens, top_k = topk_ids.shape
    # A dropped slot (id E) borrows the last expert and keeps its weight 0: static shapes, one wasted slot.
    flat_ids = topk_ids.reshape(-1).clamp(max=w13.shape[0] - 1)  # [S]
    xs = x.unsqueeze(1).expand(-1, top_k, -1).reshape(num_tokens * top_k, -1)  # [S, H] row s is token s // K
    w13_s = w13[flat_ids].to(x.dtype)  # [S, 2F, H]
    w2_s = w2[flat_ids].to(x.dtype)  # [S, H, F]
    h = torch.bmm(w13_s, xs.unsqueeze(-1)).squeeze(-1)  # [S, 2F]
    y = torch.bmm(w2_s, _silu_mul(h).unsqueeze(-1)).squeeze(-1)  # [S, H]
    y = y.view(num_tokens, top_k, -1) * topk_weights.to(x.dtype).unsqueeze(-1)  # [T, K, H]
    return y.sum(dim=1)  # [T, H]


def _decode_all_experts(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """Every token through every expert, unchosen ones weighted zero: each expert is read exactly once."""
    num_experts, two_ffn, hidden = w13.shape
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    # One GEMM against all experts' gate_up rows at once: [T, H] @ [H, E*2F].
    h = F.linear(x, w13.reshape(num_experts * two_ffn, hidden))  # [T, E*2F]
    a = _silu_mul(h.view(-1, num_experts, two_ffn)).transpose(0, 1)  # [E, T, F]
    y = torch.bmm(a, w2.transpose(1, 2))  # [E, T, H]
    dense_weights = torch.zeros(x.shape[0], num_experts + 1, dtype=x.dtype, device=x.device)  # [T, E+1]
    dense_weights.scatter_add_(1, topk_ids, topk_weights.to(x.dtype))  # column E collects dropped slots
    return torch.einsum("te,eth->th", dense_weights[:, :num_experts], y)  # [T, H]


def _static_plan(topk_weights, topk_ids, num_experts: int, capacity: int):
    """fairseq top2gating generalised to K slots -> (combine [T, E, C] float32, dispatch [T, E, C] bool,
    dropped token-slots 0-dim int64). Everything stays on the device."""
    # A dropped slot (id E) one-hots into a spare last column that is cut off: it takes no capacity.
    masks = F.one_hot(topk_ids, num_experts + 1)[..., :num_experts].unbind(dim=1)  # K x [T, E] int64
    queued = torch.zeros(num_experts, dtype=torch.int64, device=topk_ids.device)  # [E]
    kept_masks, locations = [], []
    for mask in masks:
        # Position in the expert's buffer: cumsum over tokens, behind every earlier slot's tokens
        # (fairseq: locations2 += sum(mask1)); counts are taken before dropping, as there.
        location = torch.cumsum(mask, dim=0) - 1 + queued  # [T, E]
        queued = queued + mask.sum(dim=0)
        kept = mask * (location < capacity)  # [T, E]
        kept_masks.append(kept)
        locations.append((location * kept).sum(dim=1))  # [T]
    dropped = (topk_ids < num_experts).sum() - torch.stack(kept_masks).sum()  # 0-dim int64, capacity drops only
    # Renormalise after dropping (normalize_gate_prob_before_dropping=False): a token that lost every
    # slot gets all-zero weights, hence zero output.
    gates = [topk_weights[:, k].float() * kept.sum(dim=1) for k, kept in enumerate(kept_masks)]  # K x [T]
    denom = torch.clamp(sum(gates), min=torch.finfo(torch.float32).eps)  # [T]
    combine_weights = 0
    for gate, kept, location in zip(gates, kept_masks, locations):
        gate_se = (gate / denom).unsqueeze(-1) * kept.float()  # [T, E]
        location_sc = F.one_hot(location, capacity).float()  # [T, C]
        combine_weights = combine_weights + torch.bmm(gate_se.unsqueeze(-1), location_sc.unsqueeze(1))
    return combine_weights, combine_weights.bool(), dropped
