"""Routing trace recording (`--record-trace FILE`, issue 5): every MoE layer's topk_ids and topk_weights.

Owns the observer that MoE blocks call after routing and the prefetch hook calls after predicting; it
keeps host copies in the order tokens were processed and writes them with traces.save_trace. Reading
the ids back costs a host sync per layer and step, so it is opt-in; it never changes the routing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moe_runtime.gating import Routing
from moe_runtime.traces import Trace, save_trace

# N tokens, L layers, K top-k, T tokens of one step


class TraceRecorder:
    """Attached to a model (a Transformer) from construction until detach().

    Tokens are rows in processing order: a prefill's prompt in position order, a decode step's batch in
    row order. `step_tokens` lists each step's token count (cache-sim's `batch` for a uniform run).
    """

    def __init__(self, model) -> None:
        self.model = model
        self.num_layers, self.num_experts = model.args.num_layers, model.args.num_experts
        self.step_tokens: list[int] = []
        self._ids: list[list[np.ndarray]] = [[] for _ in range(self.num_layers)]  # [L] x steps x [T, K]
        self._weights: list[list[np.ndarray]] = [[] for _ in range(self.num_layers)]
        self._predicted: list[list[np.ndarray]] = [[] for _ in range(self.num_layers)]
        for moe in model.moe_blocks:
            moe.observer = self

    def detach(self) -> None:
        for moe in self.model.moe_blocks:
            if moe.observer is self:
                moe.observer = None

    def routed(self, layer: int, routing: Routing) -> None:
        """A MoE layer's routing of one step; .cpu() is the host sync recording costs."""
        self._ids[layer].append(routing.topk_ids.cpu().numpy())
        self._weights[layer].append(routing.topk_weights.float().cpu().numpy())
        if layer == 0:
            self.step_tokens.append(int(routing.topk_ids.shape[0]))

    def predicted(self, layer: int, topk_ids: torch.Tensor) -> None:
        """The experts prefetch predicted for one layer's coming step, [T, P]."""
        self._predicted[layer].append(topk_ids.cpu().numpy())

    def trace(self) -> Trace:
        """Everything recorded so far as one Trace: topk_ids and topk_weights [N, L, K]."""
        k = self.model.args.top_k
        return Trace(_stack(self._ids, k, np.int64), _stack(self._weights, k, np.float32), self.num_experts)

    def prefetch_trace(self) -> Trace | None:
        """The predictions as a trace [N, L, P] (cache-sim --prefetch-trace), or None if there were none."""
        if not any(self._predicted):
            return None
        return Trace(_stack(self._predicted, self.model.args.top_k, np.int64), None, self.num_experts)

    def save(self, path: str | Path) -> list[Path]:
        """Write the trace to `path` and the predictions, if any, next to it as STEM.prefetch.npz."""
        path = Path(path)
        save_trace(path, self.trace())
        written = [path]
        predicted = self.prefetch_trace()
        if predicted is not None:
            written.append(path.with_name(path.name.removesuffix(".npz") + ".prefetch.npz"))
            save_trace(written[-1], predicted)
        return written


def _stack(per_layer: list[list[np.ndarray]], width: int, dtype) -> np.ndarray:
    """[L] lists of per-step [T, X] arrays -> [N, L, X] ([0, L, width] before the first step)."""
    if not any(per_layer):
        return np.zeros((0, len(per_layer), width), dtype=dtype)
    return np.stack([np.concatenate(steps) for steps in per_layer], axis=1).astype(dtype)
