"""Triton fused MoE for mid-size batches (issue 8): [dispatch] -> [expert FFN] -> [combine] in three stages.

Owns experts_fused(), vLLM fused_moe's layout (fused_moe.py, moe_align_block_size): align sorts the
token-slots by expert and pads each group to whole M-blocks on the device; gate_up gathers x rows and
writes SiLU(x w1^T) * (x w3^T); down multiplies by w2 and the routing weight into one row per slot, summed
over K in a fixed order. No host sync, static shapes: CUDA-graph capturable. It neither routes nor picks
when it runs (experts.run_experts does); triton is imported on first use only, as in triton_experts.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from moe_runtime import triton_experts

# T tokens, E experts, K top-k, H hidden, F ffn; S = T*K token-slots, slot s = t*K + k; R padded rows.
# A slot with id >= E is dropped (gating's adaptive top-p uses E): it runs no FFN and adds nothing.
# Weights are in nn.Linear layout: w13 [E, 2F, H] = cat(w1, w3) along dim 1, w2 [E, H, F].

tl = None  # triton.language, bound by _kernels() on first use: the kernels below read it as a global


@dataclass(frozen=True)
class MoeTiles:
    """Tile sizes (elements) and launch knobs of both kernels."""

    block_m: int  # padded rows (token-slots of one expert) per program
    block_f: int  # F columns per gate_up program: it reads block_f rows of w1 and of w3 (2x of w13)
    block_h: int  # H columns per down program
    block_k: int  # reduction step (H in gate_up, F in down)
    group_m: int  # M-blocks walked per N tile before the next N tile: neighbours share weight tiles in L2
    num_warps: int
    num_stages: int  # capped by _stages where the buffers would not fit shared memory


# Keyed on token-slots per expert, S / E (a shape, so no sync). Starting points are vLLM's tuned bf16
# configs for Mixtral (configs/E=8,N=14336,device_name=NVIDIA_H200.json and E=8,N=7168,...H100_80GB_HBM3
# .json, keyed on M = T, i.e. S/E = M/4 at top-2): M <= 16 -> BM 16; M 32-96 -> BM 32; M 128 -> BM 64;
# M >= 256 -> BM 128, BN 256, BK 64, 8 warps, 4 stages. vLLM's BLOCK_N spans w13's 2F rows; our gate_up
# tile holds w1 and w3 rows together, so block_f is half of it. Measured on an H100 (bench/triton_moe.py):
# the BM 64 row also wins at S/E = 64 (T=256 at top-2: 1.11 vs 1.16 ms), so it reaches there.
TILES_BY_SLOTS_PER_EXPERT: tuple[tuple[float, MoeTiles], ...] = (
    (4, MoeTiles(16, 64, 128, 128, 1, 4, 4)),
    (24, MoeTiles(32, 64, 128, 128, 16, 4, 3)),
    (64, MoeTiles(64, 64, 128, 128, 1, 4, 4)),
    (math.inf, MoeTiles(128, 128, 256, 64, 16, 8, 4)),
)


def available(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether experts_fused runs here: the same conditions as triton_experts (CUDA SM80+, bf16/fp16)."""
    return triton_experts.available(x, w13, w2)


def tiles_for(num_slots: int, num_experts: int) -> MoeTiles:
    """The table row for S / E token-slots per expert."""
    per_expert = num_slots / num_experts
    return next(tiles for bound, tiles in TILES_BY_SLOTS_PER_EXPERT if per_expert <= bound)


def experts_fused(x, w13, w2, topk_weights, topk_ids, tiles: MoeTiles | None = None) -> torch.Tensor:
    """x [T, H] -> [T, H]: SiLU(x w1^T) * (x w3^T) @ w2^T per slot, weighted and summed over K.

    Accumulates in fp32, returns x.dtype. Deterministic: no atomics; each slot's row is written once and
    the K rows of a token are summed in order. Scratch: act [R, F] and rows [S, H] in x.dtype.
    """
    num_tokens, hidden = x.shape
    num_experts, two_ffn, _ = w13.shape
    ffn, top_k = two_ffn // 2, topk_ids.shape[1]
    num_slots = num_tokens * top_k
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"want one dtype; got x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}")
    if num_slots == 0:  # an empty grid is no launch
        return torch.zeros_like(x)
    tiles = tiles or tiles_for(num_slots, num_experts)
    gate_up, down = _kernels()
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    sorted_slots, block_expert = align(topk_ids, num_experts, tiles.block_m)  # [R], [R / BM]
    num_blocks = block_expert.numel()
    weights = topk_weights.reshape(-1).contiguous()  # [S]
    act = torch.empty(sorted_slots.numel(), ffn, dtype=x.dtype, device=x.device)  # [R, F]
    rows = torch.empty(num_slots, hidden, dtype=x.dtype, device=x.device)  # [S, H]

    block_f, block_k = _block(tiles.block_f, ffn), _block(tiles.block_k, hidden)
    stages = _stages(tiles, x, (tiles.block_m + 2 * block_f) * block_k * x.element_size())
    gate_up[(num_blocks * _cdiv(ffn, block_f),)](
        x, w13, sorted_slots, block_expert, act, num_slots, num_experts, top_k, hidden, ffn, num_blocks,
        BLOCK_M=tiles.block_m, BLOCK_N=block_f, BLOCK_K=block_k, GROUP_M=tiles.group_m,
        EVEN_K=hidden % block_k == 0, num_warps=tiles.num_warps, num_stages=stages,
    )  # fmt: skip

    block_h, block_k = _block(tiles.block_h, hidden), _block(tiles.block_k, ffn)
    stages = _stages(tiles, x, (tiles.block_m + block_h) * block_k * x.element_size())
    down[(num_blocks * _cdiv(hidden, block_h),)](
        act, w2, sorted_slots, block_expert, weights, rows, num_slots, num_experts, hidden, ffn, num_blocks,
        BLOCK_M=tiles.block_m, BLOCK_N=block_h, BLOCK_K=block_k, GROUP_M=tiles.group_m,
        EVEN_K=ffn % block_k == 0, num_warps=tiles.num_warps, num_stages=stages,
    )  # fmt: skip
    if top_k == 1:
        return rows
    return rows.view(num_tokens, top_k, hidden).sum(dim=1)  # [T, H], fp32 accumulation inside sum


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort token-slots by expert, each group padded to a multiple of block_m, all on the device.

    Returns sorted_slots [R] int32 (slot index, S where a row is padding) and block_expert [R / BM] int32
    (the expert of each M-block). Dropped slots form a last group with id E (down writes their rows as
    zeros); blocks past the last group get E + 1 and exit at once. R = S + G * (BM - 1) rounded up to
    BM, G = min(E + 1, S) groups at most: a static bound, so nothing is read back to the host.
    """
    flat = topk_ids.reshape(-1).clamp(max=num_experts)  # [S]; every id >= E is dropped
    num_slots = flat.numel()
    num_groups = min(num_experts + 1, num_slots)
    num_rows = _cdiv(num_slots + num_groups * (block_m - 1), block_m) * block_m  # R
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E+1]
    padded = (counts + block_m - 1) // block_m * block_m  # [E+1]
    ends = torch.cumsum(padded, dim=0)  # [E+1] padded end row of each group
    # Stable: a group's rows stay in slot order, so the result does not depend on the sort's whims.
    order = torch.argsort(flat, stable=True)  # [S]
    group = flat[order]  # [S]
    rank = torch.arange(num_slots, device=flat.device) - (torch.cumsum(counts, 0) - counts)[group]  # [S]
    sorted_slots = torch.full((num_rows,), num_slots, dtype=torch.int32, device=flat.device)
    sorted_slots.scatter_(0, (ends - padded)[group] + rank, order.to(torch.int32))  # [R]
    block_start = torch.arange(0, num_rows, block_m, device=flat.device)  # [R / BM]
    block_expert = torch.searchsorted(ends, block_start, right=True).to(torch.int32)  # [R / BM]
    return sorted_slots, block_expert


def _gate_up_kernel(
    x_ptr, w13_ptr, sorted_ptr, block_expert_ptr, act_ptr, num_slots, num_experts, top_k, hidden, ffn,
    num_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """Program (M-block, F tile): act[rows, f] = SiLU(x[tokens] w1^T) * (x[tokens] w3^T) for one expert."""
    pid_m, pid_n = _program_tile(num_blocks, ffn, BLOCK_N, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= num_experts:  # dropped group or past the last group
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] padded rows
    slots = tl.load(sorted_ptr + offs_m)  # [BLOCK_M]
    row_ok = slots < num_slots
    tokens = (slots // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] ffn columns
    n_ok = offs_n < ffn
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * hidden + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    # int64: E * 2F * H passes 2**31 at Mixtral size. [BLOCK_K, BLOCK_N], H contiguous.
    w1_ptrs = w13_ptr + expert * 2 * ffn * hidden + offs_n.to(tl.int64)[None, :] * hidden + offs_k[:, None]
    w3_ptrs = w1_ptrs + ffn * hidden
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(0, tl.cdiv(hidden, BLOCK_K)):
        if EVEN_K:
            x_mask = row_ok[:, None]
            w_mask = n_ok[None, :]
        else:
            k_ok = offs_k < hidden - step * BLOCK_K
            x_mask = row_ok[:, None] & k_ok[None, :]
            w_mask = k_ok[:, None] & n_ok[None, :]
        xs = tl.load(x_ptrs, mask=x_mask, other=0.0)
        acc1 = tl.dot(xs, tl.load(w1_ptrs, mask=w_mask, other=0.0), acc1)
        acc3 = tl.dot(xs, tl.load(w3_ptrs, mask=w_mask, other=0.0), acc3)
        x_ptrs += BLOCK_K
        w1_ptrs += BLOCK_K
        w3_ptrs += BLOCK_K
    act = acc1 * tl.sigmoid(acc1) * acc3  # [BLOCK_M, BLOCK_N] SiLU(gate) * up, in fp32
    act_ptrs = act_ptr + offs_m.to(tl.int64)[:, None] * ffn + offs_n[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _down_kernel(
    act_ptr, w2_ptr, sorted_ptr, block_expert_ptr, weights_ptr, rows_ptr, num_slots, num_experts, hidden,
    ffn, num_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """Program (M-block, H tile): rows[slot, h] = weight[slot] * act[row] . w2[e, h]; zeros if dropped."""
    pid_m, pid_n = _program_tile(num_blocks, hidden, BLOCK_N, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert > num_experts:  # past the last group
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] padded rows
    slots = tl.load(sorted_ptr + offs_m)  # [BLOCK_M]
    row_ok = slots < num_slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] hidden columns
    n_ok = offs_n < hidden
    out_ptrs = rows_ptr + slots.to(tl.int64)[:, None] * hidden + offs_n[None, :]
    out_mask = row_ok[:, None] & n_ok[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if expert < num_experts:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = act_ptr + offs_m.to(tl.int64)[:, None] * ffn + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w2_ptr + expert * hidden * ffn + offs_n.to(tl.int64)[None, :] * ffn + offs_k[:, None]
        for step in range(0, tl.cdiv(ffn, BLOCK_K)):
            if EVEN_K:
                a_mask = row_ok[:, None]
                w_mask = n_ok[None, :]
            else:
                k_ok = offs_k < ffn - step * BLOCK_K
                a_mask = row_ok[:, None] & k_ok[None, :]
                w_mask = k_ok[:, None] & n_ok[None, :]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            acc = tl.dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        routing = tl.load(weights_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)  # [BLOCK_M]
        acc = acc * routing[:, None]
    tl.store(out_ptrs, acc.to(rows_ptr.dtype.element_ty), mask=out_mask)


def _program_tile(num_blocks, size_n, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program: GROUP_M M-blocks per N tile in turn, so programs running together
    read the same weight tile (M-blocks of one expert are adjacent) and it is fetched once into L2."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(size_n, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_blocks - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@functools.cache
def _kernels():
    """JIT the kernels on first use (TRITON_INTERPRET=1 is read here: the CPU interpreter check)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    globals()["_program_tile"] = triton.jit(_program_tile)  # device function shared by both kernels
    return triton.jit(_gate_up_kernel), triton.jit(_down_kernel)


def _stages(tiles: MoeTiles, x: torch.Tensor, bytes_per_stage: int) -> int:
    """tiles.num_stages, fewer where the buffers would not fit shared memory (16 KB kept for the epilogue)."""
    props = torch.cuda.get_device_properties(x.device) if x.is_cuda else None
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 96 * 1024
    return max(2, min(tiles.num_stages, (smem - 16 * 1024) // bytes_per_stage))


def _block(block: int, size: int) -> int:
    """A power of two >= 16 (tl.dot's minimum), no larger than needed to cover `size`."""
    return max(16, min(block, 1 << max(0, size - 1).bit_length()))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
