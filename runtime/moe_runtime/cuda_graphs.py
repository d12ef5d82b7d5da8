"""CUDA graphs of the decode step (issue 8, target 3): capture a step once per shape, replay it per token.

Owns the captured graphs, their static inputs (tokens, positions, cache rows, padding flags) and outputs
(logits and their greedy argmax), one graph per (batch bucket, attended-length bucket, row layout,
padding). It declines, and generate.decode() runs eager, on CPU, for anything host-driven (expert
parallelism, forced routing, a routing observer, expert buffering), with static gating (padding would
take capacity), or when a step would make a host sync. It never captures prefill and never samples.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moe_runtime.gating import route
from moe_runtime.model import MoEBlock, Transformer

# B batch, P padded batch (a bucket), V vocab, K top-k, M cache length per row

log = logging.getLogger(__name__)

MIN_KV_BUCKET = 256  # the attended length is rounded up to a power of two, at least this (tokens)

# Padding. A sequence with an n-token prompt and max_tokens m writes cache positions 0 .. n+m-2 (its last
# token is never fed back), and every caller bounds n+m by the cache length M, so position M-1 of every
# cache row is never written or read by a real sequence. Padded rows write there and only there. Rows are
# independent through every op of the step (row-wise GEMMs, attention per row, experts per token), so
# padded rows cannot change real ones; their expert counts are taken back out by a hook recorded into the
# graph, so the load counters see real tokens only.

_INPUTS = 4  # columns of the static input buffer: token, position, cache row, is-padding


def batch_buckets(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then steps of 16, and max_batch itself; a batch pads up."""
    sizes = {b for b in (1, 2, 4, 8) if b < max_batch} | set(range(16, max_batch, 16)) | {max_batch}
    return sorted(sizes)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [P, V] static output
    greedy_ids: torch.Tensor  # [P] int64, argmax of the float32 logits (as generate.sample's greedy)


class DecodeGraphs:
    """The decode graphs of one model and one KV cache allocation; rebuilt when either moves."""

    def __init__(self, model: Transformer, memory: tuple[int, ...]):
        self.memory, self.max_batch = memory, model.max_batch
        self.buckets = batch_buckets(model.max_batch)
        device = model.output.weight.device
        self.inputs = torch.zeros(model.max_batch, _INPUTS, dtype=torch.int64, device=device)  # [Bmax, 4]
        self.staging = torch.zeros(model.max_batch, _INPUTS, dtype=torch.int64).pin_memory()
        self._staged, self._staging_busy = torch.cuda.Event(), False  # the last copy out of `staging`
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every graph of this model
        self.graphs: dict[tuple, _Graph] = {}
        self.declined: set[tuple] = set()

    def run(self, model: Transformer, tokens, positions: list[int], slots: list[int]):
        """Replay the step for tokens [B] (device tensor or list) at `positions` in cache rows `slots`.

        Returns (logits [B, V], greedy ids [B]), views of the graph's outputs that the next replay
        overwrites; or None when this step has no graph (the caller runs eager).
        """
        key = self._key(model, positions, slots)
        if key is None or key in self.declined:
            return None
        graph = self.graphs.get(key) or self._capture(model, key)
        if graph is None:
            return None
        self._stage(tokens, positions, slots, key, model.max_cache_len)
        graph.graph.replay()
        b = len(positions)
        return graph.logits[:b], graph.greedy_ids[:b]

    def capture_buckets(self, model: Transformer) -> int:
        """Capture up front every batch bucket's graphs (cache rows in order or not, padded or not) for the
        shortest attended-length bucket, so that no request of a server waits for a capture; longer
        contexts are captured when first seen. Returns the number of graphs."""
        kv_len = min(model.max_cache_len, MIN_KV_BUCKET)
        pad_ok = not model.args.sliding_window
        for padded_to in self.buckets:
            for contiguous in (True, False):
                for padded in (False, True) if padded_to > 1 and pad_ok else (False,):
                    key = (padded_to, kv_len, contiguous, padded)
                    if key not in self.graphs and key not in self.declined:
                        self._capture(model, key)
        return len(self.graphs)

    def _key(self, model: Transformer, positions: list[int], slots: list[int]) -> tuple | None:
        b, m = len(positions), model.max_cache_len
        if not 0 < b <= self.max_batch:
            return None
        padded_to = next(p for p in self.buckets if p >= b)
        top = max(positions) + 1
        padded = padded_to > b
        if padded and (top >= m or model.args.sliding_window):
            # Position M-1 is taken, or a sliding window would leave a padded row nothing to attend to.
            return None
        kv_len = min(m, max(MIN_KV_BUCKET, 1 << (top - 1).bit_length()))
        contiguous = slots == list(range(b))  # rows 0..B-1: the cache is read through views, no gather
        return padded_to, kv_len, contiguous, padded

    def _stage(self, tokens, positions, slots, key, cache_len: int) -> None:
        """One host-to-device copy of every input column, then the tokens if they are on the device."""
        padded_to, _, contiguous, _ = key
        b = len(positions)
        if self._staging_busy:
            self._staged.synchronize()  # the previous step's copy has left the staging buffer
        host = self.staging.numpy()
        host[:padded_to, 0] = 0
        if not isinstance(tokens, torch.Tensor):
            host[:b, 0] = tokens
        host[:b, 1], host[b:padded_to, 1] = positions, cache_len - 1
        host[:b, 2] = slots
        host[b:padded_to, 2] = range(b, padded_to) if contiguous else slots[0]
        host[:b, 3], host[b:padded_to, 3] = 0, 1
        self.inputs[:padded_to].copy_(self.staging[:padded_to], non_blocking=True)
        self._staged.record()
        self._staging_busy = True
        if isinstance(tokens, torch.Tensor):
            self.inputs[:b, 0].copy_(tokens)

    def _capture(self, model: Transformer, key: tuple) -> _Graph | None:
        padded_to, kv_len, contiguous, padded = key
        cols = self.inputs[:padded_to]
        tokens, positions, slots, padding = cols[:, 0], cols[:, 1], cols[:, 2], cols[:, 3]

        def step():
            logits = model(tokens[:, None], positions[:, None], None if contiguous else slots, kv_len=kv_len)
            logits = logits[:, -1]  # [P, V]
            return logits, logits.float().argmax(dim=-1)

        # Warm up (and prove the step sync-free) on inputs that are all padding: it writes only M-1.
        cols[:, 0], cols[:, 1], cols[:, 3] = 0, model.max_cache_len - 1, 1
        cols[:, 2] = torch.arange(padded_to, device=cols.device) if contiguous else 0
        hooks = [moe.register_forward_pre_hook(_uncount_padding(padding)) for moe in model.moe_blocks
                 ] if padded else []
        counters = [moe.expert_load.clone() for moe in model.moe_blocks]
        try:
            self.graphs[key] = self._warm_up_and_record(step)
        except RuntimeError as exc:  # a host sync or an op that cannot be captured: this shape runs eager
            log.warning("decode step %s not captured, running eager: %s", key, exc)
            self.declined.add(key)
            return None
        finally:
            for hook in hooks:
                hook.remove()
            for moe, before in zip(model.moe_blocks, counters):  # the warm-up was not load
                moe.expert_load.copy_(before)
        return self.graphs[key]

    def _warm_up_and_record(self, step) -> _Graph:
        """Run step on a side stream (once for lazy initialisation, once more with host syncs raising),
        then capture it into a graph."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                step()
                with _host_sync_raises():
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits, greedy_ids = step()
        finally:
            torch.cuda.current_stream().wait_stream(side)
        return _Graph(graph, logits, greedy_ids)


def _uncount_padding(padding: torch.Tensor):
    """A MoEBlock forward pre-hook that subtracts the padded rows' token-slots from its load counters.

    It routes the block's input again exactly as MoEBlock.forward does (same router, same route()), so
    the ids are the ones the block counts; padding [P] is 1 on padded rows. Static shapes, no sync.
    """

    def hook(moe: MoEBlock, inputs) -> None:
        x = inputs[0]
        topk_ids = route(moe.router(x.reshape(-1, x.shape[-1])), moe.args.top_k).topk_ids  # [P, K]
        moe.expert_load.scatter_add_(0, topk_ids.reshape(-1), -padding[:, None].expand_as(topk_ids).reshape(-1))

    return hook


@contextmanager
def _host_sync_raises():
    """torch.cuda's sync debug mode set to raise, then restored (the mode is process-wide)."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _memory(model: Transformer) -> tuple[int, ...]:
    """Addresses a captured step has baked in that can move: KV caches, RoPE tables, experts, counters."""
    tensors = [model.rope_cos, model.rope_sin]
    for layer in model.layers:
        cache, moe = layer.attention.kv_cache, layer.moe
        tensors += [cache.k, cache.v, moe.w13, moe.w2, moe.expert_load]
    return tuple(t.data_ptr() for t in tensors)


def _capturable(model: Transformer) -> bool:
    """Only the default path is captured. Expert parallelism (collectives on the leader's schedule),
    static gating (capacity would count padding), forced routing (a trace read step by step), a routing
    observer (it keeps each step's routing), expert buffering (host-driven copies) and issue 9's route
    options (the padding correction recounts plain top-k) all run eager."""
    host_driven = ("parallel", "forced_routing", "observer", "expert_cache", "route_options")
    return (
        model.output.weight.device.type == "cuda"
        and model.max_batch > 0
        and model.step_hook is None
        and getattr(model, "expert_buffering", None) is None
        and model.gating.mode == "dynamic"
        and all(getattr(moe, name, None) is None for moe in model.moe_blocks for name in host_driven)
    )


_GRAPHS: weakref.WeakKeyDictionary[Transformer, DecodeGraphs] = weakref.WeakKeyDictionary()


def decode_graphs(model: Transformer) -> DecodeGraphs | None:
    """The model's decode graphs (captured lazily, shape by shape), or None where graphs do not apply."""
    if not _capturable(model):
        return None
    memory = _memory(model)
    graphs = _GRAPHS.get(model)
    if graphs is None or graphs.memory != memory or graphs.max_batch != model.max_batch:
        graphs = _GRAPHS[model] = DecodeGraphs(model, memory)
    return graphs


def capture_decode_graphs(model: Transformer) -> int:
    """DecodeGraphs.capture_buckets for the model's current cache; 0 where graphs do not apply."""
    graphs = decode_graphs(model)
    return 0 if graphs is None else graphs.capture_buckets(model)
