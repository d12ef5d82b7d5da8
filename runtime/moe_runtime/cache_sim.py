"""Replay routing traces through the eviction policies: the `moe-runtime cache-sim` command (issue 5).

Owns the offline simulator (one cold pool per layer, batched steps, recorded prefetch predictions),
prefetch recall and the miss-rate table. Torch-free: must not import torch, so it runs wherever a
trace can be read; the pools themselves are `cache_policy`'s, the same the live cache uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moe_runtime.cache_policy import (
    ONLINE_POLICIES,
    POLICIES,
    EvictionPolicy,
    make_policy,
    validate_slots,
)
from moe_runtime.traces import Trace, load_trace

# N tokens, L layers, K top-k, P predictions per token, E experts, S steps (S = ceil(N / batch))


@dataclass(frozen=True)
class SimResult:
    """Counters of one replay, per layer ([L] int arrays)."""

    policy: str
    slots: int
    batch: int
    prefetch: bool
    accesses: np.ndarray  # distinct experts needed per step, summed over steps
    hits: np.ndarray  # needed and resident (after any prefetch)
    misses: np.ndarray  # needed and not resident after prefetch: demand loads that stall the step
    prefetch_loads: np.ndarray  # copies issued by prefetch, useful or not
    evictions: np.ndarray

    @property
    def label(self) -> str:
        return f"{self.policy}+prefetch" if self.prefetch else self.policy

    @property
    def loads(self) -> np.ndarray:
        """Every host-to-device copy: demand misses plus prefetches. [L]"""
        return self.misses + self.prefetch_loads

    @property
    def layer_miss_rate(self) -> np.ndarray:
        return self.misses / np.maximum(self.accesses, 1)  # [L]

    @property
    def miss_rate(self) -> float:
        return float(self.misses.sum() / max(int(self.accesses.sum()), 1))

    @property
    def worst_miss_rate(self) -> float:
        """The worst layer's miss rate (the paper's Fig. 12 reports the worst case over layers)."""
        return float(self.layer_miss_rate.max()) if self.accesses.size else 0.0

    def to_dict(self) -> dict:
        counters = ("accesses", "hits", "misses", "prefetch_loads", "evictions", "loads")
        return {
            "policy": self.policy,
            "slots": self.slots,
            "batch": self.batch,
            "prefetch": self.prefetch,
            "miss_rate": self.miss_rate,
            "worst_layer_miss_rate": self.worst_miss_rate,
            **{f"total_{name}": int(getattr(self, name).sum()) for name in counters},
            "layers": {name: getattr(self, name).tolist() for name in counters}
            | {"miss_rate": self.layer_miss_rate.tolist()},
        }


def simulate(
    trace: Trace, slots: int, policy: str, batch: int = 1, prefetch: np.ndarray | None = None
) -> SimResult:
    """Replay `trace` through one cold pool of `slots` per layer, `batch` consecutive tokens per step.

    `prefetch` [N, L, P]: the experts predicted for each token and layer (negative = no prediction).
    Before each step, the step's predictions (every token's first, then every token's second, ...)
    are loaded through `EvictionPolicy.prefetch`; a miss is then a needed expert still not resident.
    """
    validate_slots(slots, trace.top_k, trace.experts)
    if batch < 1:
        raise ValueError(f"batch must be >= 1 token per step, got batch={batch}")
    needed = _step_rows(trace.topk_ids, batch)  # per layer, per step; access() dedups
    if trace.num_tokens % batch:
        for layer_steps in needed:
            layer_steps[-1] = [e for e in layer_steps[-1] if e >= 0]  # the short last step's padding
    predicted = None
    if prefetch is not None:
        _check_prefetch(np.asarray(prefetch), trace)
        predicted = _step_rows(np.asarray(prefetch), batch)
    counters = np.zeros((5, trace.num_layers), dtype=np.int64)  # [counter, L]
    for layer, layer_steps in enumerate(needed):
        pool = make_policy(policy, slots, future=layer_steps if policy == "belady" else None)
        counters[:, layer] = _replay(pool, layer_steps, None if predicted is None else predicted[layer])
    return SimResult(policy, slots, batch, prefetch is not None, *counters)


def _step_rows(ids: np.ndarray, batch: int) -> list[list[list[int]]]:
    """[N, L, X] ids -> per layer, per step, the step's ids rank-major (every token's first id, then
    every token's second, ...), -1 where the last step is short of tokens."""
    n, num_layers, x = ids.shape
    steps = -(-n // batch)
    padded = np.full((steps * batch, num_layers, x), -1, dtype=np.int64)
    padded[:n] = ids
    rows = padded.reshape(steps, batch, num_layers, x).transpose(2, 0, 3, 1)  # [L, S, X, B]
    return rows.reshape(num_layers, steps, x * batch).tolist()


def _check_prefetch(prefetch: np.ndarray, trace: Trace) -> None:
    n, num_layers = trace.topk_ids.shape[:2]
    if prefetch.ndim != 3 or prefetch.shape[:2] != (n, num_layers):
        raise ValueError(f"prefetch must be [tokens={n}, layers={num_layers}, P], got shape {prefetch.shape}")
    if not np.issubdtype(prefetch.dtype, np.integer):
        raise ValueError(f"prefetch ids must be integers, got {prefetch.dtype}")
    if prefetch.size and prefetch.max() >= trace.experts:
        raise ValueError(f"prefetch names expert {prefetch.max()} but the trace has {trace.experts} experts")


def _replay(pool: EvictionPolicy, steps: list[list[int]], predicted: list[list[int]] | None) -> list[int]:
    """[accesses, hits, misses, prefetch_loads, evictions] of one layer, from the pool's own counters
    (the ones the live cache exports)."""
    access = pool.access
    if predicted is None:
        for needed in steps:
            access(needed)
    else:
        for needed, guess in zip(steps, predicted):
            pool.prefetch(e for e in guess if e >= 0)
            access(needed)
    return [pool.hits + pool.misses, pool.hits, pool.misses, pool.prefetch_loads, pool.evictions]


def prefetch_recall(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Fraction of the actual (token, layer, expert) routings that were predicted for that token and
    layer. predicted [N, L, P], actual [N, L, K]; 1.0 when nothing was needed."""
    predicted, actual = np.asarray(predicted), np.asarray(actual)
    if predicted.shape[:-1] != actual.shape[:-1]:
        raise ValueError(f"predicted {predicted.shape} and actual {actual.shape} differ before the last axis")
    if actual.size == 0:
        return 1.0
    found = (actual[..., :, None] == predicted[..., None, :]).any(axis=-1)  # [N, L, K]
    return float(found.mean())


def format_miss_rates(results: Sequence[SimResult]) -> str:
    """A Markdown table (aligned, so it reads as plain text too): one row per policy, one column per
    slot count; a cell is the miss rate over all layers and, in parentheses, the worst layer's."""
    slot_counts = sorted({r.slots for r in results})
    labels = list(dict.fromkeys(r.label for r in results))
    cells = {(r.label, r.slots): f"{r.miss_rate:.1%} ({r.worst_miss_rate:.1%})" for r in results}
    table = [["policy", *(f"slots={s}" for s in slot_counts)]]
    table += [[label, *(cells.get((label, s), "-") for s in slot_counts)] for label in labels]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _comma_list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse


def add_cache_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `moe-runtime cache-sim`; run it with `cache_sim_main(args)`."""
    parser.add_argument("trace", help="routing trace .npz: topk_ids [tokens, layers, k]")
    parser.add_argument(
        "--slots",
        type=_comma_list(int),
        help="slots per layer, comma-separated (default: k, E/4, E/2, 3E/4, E)",
    )
    parser.add_argument(
        "--policy",
        type=_comma_list(str),
        default=list(ONLINE_POLICIES),
        help=f"eviction policies, comma-separated, from {','.join(POLICIES)} (belady is always added)",
    )
    parser.add_argument("--batch", type=int, default=1, help="consecutive tokens decoded together per step")
    parser.add_argument(
        "--prefetch-trace",
        metavar="FILE",
        help="trace whose topk_ids [tokens, layers, P] are the predicted experts; online policies "
        "are then replayed with and without prefetch",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def cache_sim_main(args: argparse.Namespace) -> int:
    """Run the sweep and print it; returns the exit status (2 on invalid input, with a message)."""
    try:
        report, results = _sweep(args)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        print(f"cache-sim: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report | {"results": [r.to_dict() for r in results]}))
        return 0
    recall = report["prefetch_recall"]
    print(
        f"{report['trace']}: {report['tokens']} tokens, {report['layers']} layers, top_k={report['top_k']}, "
        f"{report['num_experts']} experts, batch {report['batch']}"
        + ("" if recall is None else f", prefetch recall {recall:.1%}")
    )
    print("miss rate over all layers (worst layer), cold start, one pool per layer\n")
    print(format_miss_rates(results))
    print("\nbelady: offline optimum without prefetch (a lower bound where a step needs more than `slots`)")
    return 0


def _sweep(args: argparse.Namespace) -> tuple[dict, list[SimResult]]:
    trace = load_trace(args.trace)
    k, e = trace.top_k, trace.experts
    slot_counts = args.slots or sorted({k, *(s for s in (e // 4, e // 2, 3 * e // 4, e) if s >= k)})
    online = [p for p in dict.fromkeys(args.policy) if p != "belady"]
    for name in online:
        make_policy(name, 1)  # rejects an unknown name before any replay
    for slots in slot_counts:
        validate_slots(slots, k, e)
    prefetch = None if args.prefetch_trace is None else load_trace(args.prefetch_trace).topk_ids
    results = []
    for slots in slot_counts:
        for name in online:
            results.append(simulate(trace, slots, name, args.batch))
            if prefetch is not None:
                results.append(simulate(trace, slots, name, args.batch, prefetch))
        results.append(simulate(trace, slots, "belady", args.batch))  # demand-only optimum, the reference
    report = {
        "trace": str(args.trace),
        "tokens": trace.num_tokens,
        "layers": trace.num_layers,
        "top_k": k,
        "num_experts": e,
        "batch": args.batch,
        "prefetch_trace": args.prefetch_trace,
        "prefetch_recall": None if prefetch is None else prefetch_recall(prefetch, trace.topk_ids),
    }
    return report, results
