"""Triton expert FFN for a few token-slots (decode): streams only the chosen experts' weights (issue 8).

Owns experts_gemv() and its two kernels, [expert FFN] -> [combine] for T*K <= GEMV_MAX_SLOTS. It imports
triton only when asked about a CUDA tensor or first run, so the runtime imports without it (CI has none);
available() says whether it can run. It neither routes nor sorts: expert ids are read on the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# T tokens, E experts, K top-k, H hidden, F ffn; S = T*K token-slots, slot s = t*K + k.
# A slot with id E is dropped (gating's adaptive top-p): it reads no weights and adds nothing.
# Weights are in nn.Linear layout: w13 [E, 2F, H] = cat(w1, w3) along dim 1, w2 [E, H, F].

# experts_decode takes this kernel at or below it. Tiles hold every slot at once (16 columns up to 16
# slots, then wider tiles and fewer pipeline stages); beyond it the dynamic path's grouped GEMM, which
# also reads each chosen expert once, is the better fit.
GEMV_MAX_SLOTS: int = 16

tl = None  # triton.language, bound by _kernels() on first use: the kernels below read it as a global


@dataclass(frozen=True)
class GemvConfig:
    """Tile sizes (elements). Default: 64 weight rows x 256 columns a step, the tile of vLLM's fused_moe
    H100 config for Mixtral at M=1; not yet tuned on a GPU (bench/triton_experts.py sweeps others)."""

    block_f: int = 32  # rows of each of w1 and w3 per program of the first kernel
    block_h: int = 256  # hidden columns per step of the first kernel
    block_h2: int = 64  # rows of w2 (output columns) per program of the second kernel
    block_f2: int = 256  # ffn columns per step of the second kernel
    split_f: int = 2048  # ffn columns per program of the second kernel (split-K into fp32 partial sums)
    num_warps: int = 4
    num_stages: int = 4  # tile buffers in flight; capped so they fit the device's shared memory


def available(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether experts_gemv runs here: triton importable, CUDA SM80+, bf16/fp16, one dtype, contiguous."""
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if w13.dtype != x.dtype or w2.dtype != x.dtype or not (w13.is_contiguous() and w2.is_contiguous()):
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 0) and _triton_importable()


def experts_gemv(x, w13, w2, topk_weights, topk_ids, config: GemvConfig | None = None) -> torch.Tensor:
    """x [T, H] -> [T, H]: SiLU(x w1^T) * (x w3^T) @ w2^T per slot, weighted and summed over K.

    Each chosen expert's weights are read once (the first slot naming it computes every slot that names
    it). Static shapes and no host sync: CUDA-graph capturable. Accumulates in fp32, returns x.dtype.
    Deterministic: the second kernel writes fp32 partial sums, reduced in a fixed order (no atomics), so
    a captured decode step gives the same tokens as an eager one.
    """
    config = config or GemvConfig()
    gate_up, down = _kernels()
    num_tokens, hidden = x.shape
    num_experts, two_ffn, _ = w13.shape
    ffn, top_k = two_ffn // 2, topk_ids.shape[1]
    num_slots = num_tokens * top_k
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"want one dtype; got x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}")
    if num_slots == 0:  # an empty grid is no launch
        return torch.zeros_like(x)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    ids = topk_ids.reshape(-1).contiguous()  # [S]
    weights = topk_weights.reshape(-1).contiguous()  # [S]
    block_s = max(16, _next_power_of_2(num_slots))  # tl.dot wants every dimension >= 16
    act = torch.empty(num_slots, ffn, dtype=x.dtype, device=x.device)  # [S, F]

    block_f, block_h = _block(config.block_f, ffn), _block(config.block_h, hidden)
    stages = _stages(config, x, (2 * block_f * block_h + block_h * block_s) * x.element_size())
    gate_up[(num_slots, _cdiv(ffn, block_f))](
        x, w13, ids, act, num_slots, num_experts, top_k, hidden, ffn,
        BLOCK_S=block_s, BLOCK_F=block_f, BLOCK_H=block_h, EVEN_H=hidden % block_h == 0,
        num_warps=config.num_warps, num_stages=stages,
    )  # fmt: skip

    block_h2, block_f2 = _block(config.block_h2, hidden), _block(config.block_f2, ffn)
    split_f = _cdiv(max(config.split_f, block_f2), block_f2) * block_f2  # a whole number of steps
    stages = _stages(config, x, (block_h2 * block_f2 + block_f2 * block_s) * x.element_size())
    num_splits = _cdiv(ffn, split_f)
    partial = torch.empty(num_tokens, top_k * num_splits, hidden, dtype=torch.float32, device=x.device)
    down[(num_slots, _cdiv(hidden, block_h2), num_splits)](
        act, w2, ids, weights, partial, num_slots, num_experts, top_k, hidden, ffn, num_splits,
        BLOCK_S=block_s, BLOCK_H=block_h2, BLOCK_F=block_f2, SPLIT_F=split_f,
        num_warps=config.num_warps, num_stages=stages,
    )  # fmt: skip
    return partial.sum(dim=1).to(x.dtype)  # [T, K*splits, H] -> [T, H]


def _gate_up_kernel(
    x_ptr, w13_ptr, ids_ptr, act_ptr, num_slots, num_experts, top_k, hidden, ffn,
    BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
):  # fmt: skip
    """Program (slot, f tile): act[s, f] = SiLU(x w1^T) * (x w3^T) for every slot s of this slot's expert.

    Tiles are transposed (weights [BLOCK_F, BLOCK_H] @ x^T [BLOCK_H, BLOCK_S]) so the long side of the
    dot is the weight rows, and weight loads run along H, the contiguous axis.
    """
    slot, pid_f = tl.program_id(0), tl.program_id(1)
    lead, mine, tokens, expert = _expert_slots(ids_ptr, slot, num_slots, num_experts, top_k, BLOCK_S)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F]
    offs_h = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    f_ok = offs_f < ffn
    # int64: E * 2F * H passes 2**31 at Mixtral size.
    w1_ptrs = w13_ptr + expert * 2 * ffn * hidden + offs_f.to(tl.int64)[:, None] * hidden + offs_h[None, :]
    w3_ptrs = w1_ptrs + ffn * hidden
    x_ptrs = x_ptr + tokens[None, :] * hidden + offs_h[:, None]  # [BLOCK_H, BLOCK_S]
    acc1 = tl.zeros([BLOCK_F, BLOCK_S], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_F, BLOCK_S], dtype=tl.float32)
    # Only the lead slot of an expert streams its weights; the others run zero steps.
    for step in range(0, tl.cdiv(hidden, BLOCK_H) * lead):
        if EVEN_H:
            w_mask = f_ok[:, None]
            x_mask = mine[None, :]
        else:
            h_ok = offs_h < hidden - step * BLOCK_H
            w_mask = f_ok[:, None] & h_ok[None, :]
            x_mask = h_ok[:, None] & mine[None, :]
        w1 = tl.load(w1_ptrs, mask=w_mask, other=0.0)
        w3 = tl.load(w3_ptrs, mask=w_mask, other=0.0)
        xs = tl.load(x_ptrs, mask=x_mask, other=0.0)
        acc1 = tl.dot(w1, xs, acc1)
        acc3 = tl.dot(w3, xs, acc3)
        w1_ptrs += BLOCK_H
        w3_ptrs += BLOCK_H
        x_ptrs += BLOCK_H
    act = acc1 * tl.sigmoid(acc1) * acc3  # [BLOCK_F, BLOCK_S] SiLU(gate) * up, in fp32
    act_ptrs = act_ptr + tl.arange(0, BLOCK_S)[None, :] * ffn + offs_f[:, None]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=f_ok[:, None] & mine[None, :])


def _down_kernel(
    act_ptr, w2_ptr, ids_ptr, weights_ptr, partial_ptr, num_slots, num_experts, top_k, hidden, ffn, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
    SPLIT_F: tl.constexpr,
):  # fmt: skip
    """Program (slot, h tile, f split): partial[s, split, h] = w[s] * act[s, f split] . w2[e, h, f split]
    for every slot s of this slot's expert. Splitting F gives ~900 programs at T=1, not 128 (132 SMs)."""
    slot, pid_h, pid_f = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lead, mine, _, expert = _expert_slots(ids_ptr, slot, num_slots, num_experts, top_k, BLOCK_S)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    offs_f = pid_f * SPLIT_F + tl.arange(0, BLOCK_F)  # [BLOCK_F]
    h_ok = offs_h < hidden
    w_ptrs = w2_ptr + expert * hidden * ffn + offs_h.to(tl.int64)[:, None] * ffn + offs_f[None, :]
    a_ptrs = act_ptr + tl.arange(0, BLOCK_S)[None, :] * ffn + offs_f[:, None]  # [BLOCK_F, BLOCK_S]
    acc = tl.zeros([BLOCK_H, BLOCK_S], dtype=tl.float32)
    f_end = tl.minimum(ffn - pid_f * SPLIT_F, SPLIT_F)  # columns of this split, from its start
    for step in range(0, tl.cdiv(f_end, BLOCK_F) * lead):
        f_ok = tl.arange(0, BLOCK_F) < f_end - step * BLOCK_F
        w = tl.load(w_ptrs, mask=h_ok[:, None] & f_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=f_ok[:, None] & mine[None, :], other=0.0)
        acc = tl.dot(w, a, acc)
        w_ptrs += BLOCK_F
        a_ptrs += BLOCK_F
    slots = tl.arange(0, BLOCK_S)
    routing = tl.load(weights_ptr + slots, mask=mine, other=0.0).to(tl.float32)  # [BLOCK_S]
    # Every partial row is written once: by its expert's lead, or, for a dropped slot (no lead), as zeros
    # by the slot's own program (its column of acc * routing is zero).
    own = tl.where(slots == slot, (expert >= num_experts).to(tl.int32), 0) != 0
    rows = mine | own  # [BLOCK_S]
    partial_ptrs = partial_ptr + (slots[None, :] * num_splits + pid_f) * hidden + offs_h[:, None]
    tl.store(partial_ptrs, acc * routing[None, :], mask=h_ok[:, None] & rows[None, :])


def _expert_slots(ids_ptr, slot, num_slots, num_experts, top_k, BLOCK_S: tl.constexpr):
    """(lead, mine [BLOCK_S], tokens [BLOCK_S], expert int64): `slot` leads when it is the first slot
    naming its expert, which is not dropped; mine marks the slots it then computes (none unless lead)."""
    slots = tl.arange(0, BLOCK_S)
    ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=num_experts)  # [BLOCK_S]
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    first = tl.min(tl.where(ids == expert, slots, BLOCK_S), axis=0)
    lead = ((first == slot) & (expert < num_experts)).to(tl.int32)
    # `!= 0` rather than `&` with the scalar: Triton 3.9's interpreter widens bool & scalar to an int mask.
    mine = tl.where(ids == expert, lead, 0) != 0  # [BLOCK_S]; padding slots hold id E, never the expert
    return lead, mine, slots // top_k, expert


@functools.cache
def _kernels():
    """JIT the kernels on first use (TRITON_INTERPRET=1 is read here: the CPU interpreter check)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    # _expert_slots is a device function called by both kernels: jit it under its own global name.
    globals()["_expert_slots"] = triton.jit(_expert_slots)
    return triton.jit(_gate_up_kernel), triton.jit(_down_kernel)


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _stages(config: GemvConfig, x: torch.Tensor, bytes_per_stage: int) -> int:
    """config.num_stages, fewer where that many tile buffers would not fit shared memory (16 KB kept for
    the epilogue's layout conversion): 4 x 40 KB fits an H100 or A100, 2 stages a 100 KB SM86/89."""
    props = torch.cuda.get_device_properties(x.device) if x.is_cuda else None
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 96 * 1024
    return max(2, min(config.num_stages, (smem - 16 * 1024) // bytes_per_stage))


def _block(block: int, size: int) -> int:
    """A power of two >= 16 (tl.dot's minimum), no larger than needed to cover `size`."""
    return max(16, min(block, _next_power_of_2(size)))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
