"""Routing traces: the one on-disk format every tool reads (cache-sim, plan, benchmarks).

A trace is a `.npz` with `topk_ids` [tokens, layers, k] (integers, tokens in decode order) and
optionally `topk_weights` [tokens, layers, k]. Torch-free: the operator and the planners use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# N tokens, L layers, K top-k, E experts


@dataclass(frozen=True)
class Trace:
    topk_ids: np.ndarray  # [N, L, K] int
    topk_weights: np.ndarray | None = None  # [N, L, K] float
    num_experts: int | None = None

    def __post_init__(self) -> None:
        if self.topk_ids.ndim != 3:
            raise ValueError(f"topk_ids must be [tokens, layers, k], got shape {self.topk_ids.shape}")
        if not np.issubdtype(self.topk_ids.dtype, np.integer):
            raise ValueError(f"topk_ids must be integers, got {self.topk_ids.dtype}")
        if self.topk_weights is not None and self.topk_weights.shape != self.topk_ids.shape:
            raise ValueError(
                f"topk_weights shape {self.topk_weights.shape} != topk_ids shape {self.topk_ids.shape}"
            )
        if self.topk_ids.size and self.topk_ids.min() < 0:
            raise ValueError("topk_ids must be non-negative")

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[2])

    @property
    def experts(self) -> int:
        """Number of experts: as recorded, else inferred from the largest id."""
        if self.num_experts is not None:
            return self.num_experts
        return int(self.topk_ids.max()) + 1 if self.topk_ids.size else 0

    def split(self, fraction: float = 0.5) -> tuple[Trace, Trace]:
        """First `fraction` of the tokens and the rest (the paper's fit/held-out protocol)."""
        cut = int(self.num_tokens * fraction)
        w = self.topk_weights
        return (
            Trace(self.topk_ids[:cut], None if w is None else w[:cut], self.num_experts),
            Trace(self.topk_ids[cut:], None if w is None else w[cut:], self.num_experts),
        )


def save_trace(path: str | Path, trace: Trace) -> None:
    arrays = {"topk_ids": trace.topk_ids.astype(np.int16 if trace.experts < 2**15 else np.int32)}
    if trace.topk_weights is not None:
        arrays["topk_weights"] = trace.topk_weights.astype(np.float16)
    if trace.num_experts is not None:
        arrays["num_experts"] = np.asarray(trace.num_experts, dtype=np.int32)
    np.savez_compressed(path, **arrays)


def load_trace(path: str | Path) -> Trace:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "topk_ids" not in data:
                raise ValueError(f"{path}: no 'topk_ids' array (found {sorted(data.files)})")
            ids = data["topk_ids"].astype(np.int64)
            weights = data["topk_weights"].astype(np.float32) if "topk_weights" in data else None
            num_experts = int(data["num_experts"]) if "num_experts" in data else None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read trace {path}: {exc}") from exc
    return Trace(ids, weights, num_experts)


def synthetic_skewed_trace(
    num_tokens: int,
    num_layers: int,
    num_experts: int,
    top_k: int,
    *,
    zipf: float = 1.0,
    reuse: float = 0.5,
    seed: int = 0,
) -> Trace:
    """The fixed synthetic skewed generator of the buffering issue (label its results "synthetic").

    Per layer a random permutation of the experts gets Zipf(`zipf`) popularity; each token samples
    top-k experts without replacement from it; with probability `reuse` a token reuses the previous
    token's experts (temporal locality).
    """
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)
    popularity = ranks**-zipf
    popularity /= popularity.sum()
    probs = np.stack([popularity[rng.permutation(num_experts)] for _ in range(num_layers)])  # [L, E]
    ids = np.empty((num_tokens, num_layers, top_k), dtype=np.int64)
    for t in range(num_tokens):
        for layer in range(num_layers):
            if t > 0 and rng.random() < reuse:
                ids[t, layer] = ids[t - 1, layer]
            else:
                ids[t, layer] = rng.choice(num_experts, size=top_k, replace=False, p=probs[layer])
    return Trace(ids, None, num_experts)
