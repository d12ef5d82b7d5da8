"""Expert buffering (issue 5; paper section 4): a few experts per layer on the device, every master on the host.

Owns per MoE layer a fixed pool of device slots (one contiguous buffer per expert), the read-only host
masters (pinned on CUDA, never written back), the copies on a dedicated stream ordered by events,
layer-ahead prefetch and the counters. Which expert to evict is cache_policy's decision (the classes that
cache-sim replays, so a replay reproduces the live counters); it must not decide that itself.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from moe_runtime.cache_policy import Load, StepPlan, make_policy
from moe_runtime.config import ExpertBufferingConfig
from moe_runtime.errors import ConfigError
from moe_runtime.experts import _ffn
from moe_runtime.gating import ForcedRouting, Routing, forced_route

# T tokens, K top-k, E experts, H hidden, F expert ffn, S slots per layer, L layers.
# A slot, and a master, is one expert packed as one row [3*F*H]: w13 [2F, H] then w2 [H, F] (nn.Linear layout).

PINNED_BLOCK_BYTES = 1 << 30  # pinned host memory is allocated in blocks of whole masters up to this size


def resolve_slots(config: ExpertBufferingConfig, args, dtype: torch.dtype, holds: int | None = None) -> int:
    """Slots per layer: `slots_per_layer`, or the `gpu_memory_bytes` budget split evenly over the layers.

    More slots than experts buy nothing: clamped to `holds`, the experts a layer's pool serves (E; under
    expert parallelism the rank's slots per layer). Fewer than top_k cannot hold one token's experts at
    once: a ConfigError naming both numbers.
    """
    per_expert = args.expert_bytes(dtype)
    if config.slots_per_layer is not None:
        slots, source = config.slots_per_layer, f"slots_per_layer={config.slots_per_layer} is"
    else:
        slots = config.gpu_memory_bytes // (args.num_layers * per_expert)
        source = (f"gpu_memory_bytes={config.gpu_memory_bytes} holds {slots} slot(s) per layer "
                  f"({args.num_layers} layers of {per_expert}-byte experts),")
    if slots < args.top_k:
        raise ConfigError(f"expert_buffering: {source} fewer than top_k={args.top_k}: every expert a token "
                          f"is routed to must be resident at once")
    return min(slots, args.num_experts if holds is None else holds)


def _host_rows(count: int, numel: int, dtype: torch.dtype, pin: bool) -> list[torch.Tensor]:
    """`count` host rows of `numel` elements, as 1-D views; pinned when `pin`.

    Pinned in blocks of whole rows of at most PINNED_BLOCK_BYTES: torch's pinned allocator rounds each
    block up to a power of two, so one block per layer could waste almost half of it.
    """
    row_bytes = numel * torch.empty((), dtype=dtype).element_size()
    per_block = max(1, min(count, PINNED_BLOCK_BYTES // row_bytes)) if pin else count
    rows: list[torch.Tensor] = []
    for start in range(0, count, per_block):
        block = torch.empty(min(per_block, count - start), numel, dtype=dtype, pin_memory=pin)
        rows.extend(block.unbind(0))
    return rows


def _timing_event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


class Copier:
    """Host-to-device copies and the compute stream's waits for them, timed.

    CUDA: copies run on a dedicated stream, each bracketed by timing events (copy_seconds is that
    stream's busy time); a wait is a stream-side wait, timed by events around it (stall_seconds).
    CPU: the "device" pool is just another tensor set; a copy is a plain copy and all of it is stall.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.copy_seconds = self.stall_seconds = 0.0
        self._copies: list[tuple] = []  # (start, end) event pairs not read yet, in stream order
        self._stalls: list[tuple] = []

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after) -> torch.cuda.Event | None:
        """dst <- src once the event `after` (the slot's last reader) has passed; returns the copy's end."""
        if not self.cuda:
            start = time.perf_counter()
            dst.copy_(src)
            elapsed = time.perf_counter() - start
            self.copy_seconds += elapsed
            self.stall_seconds += elapsed
            return None
        start, end = _timing_event(), _timing_event()
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            start.record(self.stream)
            dst.copy_(src, non_blocking=True)
            end.record(self.stream)
        self._copies.append((start, end))
        return end

    def wait(self, ready: torch.cuda.Event | None) -> None:
        """Order the compute (current) stream after a copy; the host does not block."""
        if ready is None or ready.query():
            return
        stream = torch.cuda.current_stream()
        before, after = _timing_event(), _timing_event()
        before.record(stream)
        stream.wait_event(ready)
        after.record(stream)
        self._stalls.append((before, after))

    def mark_used(self) -> torch.cuda.Event | None:
        """An event after the compute work queued so far (a slot's last reader); None on CPU."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def settle(self, wait: bool) -> None:
        """Add the timings of finished copies and waits to the totals; wait=True finishes them all first."""
        if self.cuda and wait:
            self.stream.synchronize()
            torch.cuda.current_stream().synchronize()
        self.copy_seconds += _finished_seconds(self._copies)
        self.stall_seconds += _finished_seconds(self._stalls)


def _finished_seconds(pairs: list[tuple]) -> float:
    """Sum and drop the leading event pairs whose end has passed (one stream completes them in order)."""
    done, total = 0, 0.0
    while done < len(pairs) and pairs[done][1].query():
        total += pairs[done][0].elapsed_time(pairs[done][1]) / 1e3
        done += 1
    del pairs[:done]
    return total


def _refuse_capture(x: torch.Tensor) -> None:
    """A buffered step syncs the host, which a CUDA graph cannot hold (cuda_graphs then runs it eager)."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("a buffered MoE step syncs the host every step: it cannot be captured in a CUDA graph")


class ExpertCache:
    """One MoE layer's device slots: each step asks the eviction policy for a plan, issues the misses'
    copies, runs the resident experts while they fly, then the rest, each after its own copy, in waves
    when the step needs more experts than slots; combines exactly as experts_dynamic does."""

    def __init__(self, masters: list[torch.Tensor], slots: int, policy: str, shape: tuple[int, int],
                 device: torch.device, copier: Copier) -> None:
        self.masters, self.copier = masters, copier  # E host rows [3FH], read-only
        self.ffn, self.hidden = shape
        self.pool = torch.empty(slots, masters[0].numel(), dtype=masters[0].dtype, device=device)  # [S, 3FH]
        self.row_bytes = self.pool[0].numel() * self.pool.element_size()
        self.policy = make_policy(policy, slots)
        self.ready: list = [None] * slots  # slot -> end of its last copy, until the compute stream waited
        self.used: list = [None] * slots  # slot -> event after the last FFN that read it
        self.copied_bytes = 0
        self.prediction: torch.Tensor | None = None  # [T, K] ids prefetch predicted for the coming step
        self.forced_prediction: ForcedRouting | None = None  # recorded predictions replayed (benchmarks)
        self.recall_found = torch.zeros((), dtype=torch.int64, device=device)  # predicted routings, on device
        self.recall_total = 0  # routings scored

    def weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one slot: w13 [2F, H], w2 [H, F]."""
        f, h = self.ffn, self.hidden
        row = self.pool[slot]
        return row[: 2 * f * h].view(2 * f, h), row[2 * f * h :].view(h, f)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [T, H] and its routing -> the MoE output [T, H], as run_experts with every expert resident."""
        _refuse_capture(x)
        # Host sync, once per layer and step (issue 5 allows it here): the policy plans on the host, and
        # the per-expert row counts slice the sorted rows below with no further sync.
        counts = routing.expert_counts.tolist()  # [E]
        self._score_prediction(routing.topk_ids)
        needed = [e for e, n in enumerate(counts) if n]
        plan = self.policy.access(needed)
        order = torch.argsort(routing.topk_ids.reshape(-1), stable=True)  # [T*K] grouped by expert
        token_of_row = order // routing.topk_ids.shape[1]  # [T*K]
        xs = x[token_of_row]  # [T*K, H]
        ys = torch.zeros_like(xs)  # [T*K, H]; zeros: dropped slots (id E, adaptive top-p) run no expert
        ends = list(itertools.accumulate(counts))
        rows = {e: (ends[e] - counts[e], ends[e]) for e in needed}

        def run(expert: int, slot: int) -> None:
            start, end = rows[expert]
            self.copier.wait(self.ready[slot])
            self.ready[slot] = None  # the compute stream is ordered after that copy from now on
            ys[start:end] = _ffn(xs[start:end], *self.weights(slot))
            self.used[slot] = self.copier.mark_used()

        self._execute(plan, set(needed), run)
        ys = ys * routing.topk_weights.reshape(-1)[order, None].to(x.dtype)  # [T*K, H]
        return torch.zeros_like(x).index_add_(0, token_of_row, ys)  # [T, H]

    def _execute(self, plan: StepPlan, needed: set[int], run) -> None:
        """Issue one step's copies and FFNs in a safe order. Copies that evict nothing the step needs go
        first, so they overlap the hits' FFNs; a wave load (it evicts an expert the step needs: the
        StepPlan's waves) is issued only after that expert's FFN, which its copy then waits for; loaded
        experts run last, each after its own copy."""
        slot_of, done = dict(plan.hits), set()
        loads = list(plan.loads)
        first_wave = next((i for i, load in enumerate(loads) if load.evicted in needed), len(loads))
        for load in loads[:first_wave]:
            slot_of[load.expert] = self._load(load)
        for expert, slot in plan.hits:
            run(expert, slot)
            done.add(expert)
        for load in loads[first_wave:]:
            if load.evicted in needed and load.evicted not in done:
                run(load.evicted, slot_of[load.evicted])
                done.add(load.evicted)
            slot_of[load.expert] = self._load(load)
        for load in loads:
            if load.expert not in done:
                run(load.expert, slot_of[load.expert])
                done.add(load.expert)
        assert done == needed, (done, needed)

    def _load(self, load: Load) -> int:
        """Copy a master into its slot once the slot's last reader is done; returns the slot."""
        assert load.slot >= 0, load  # STREAMED is Belady's, and the live cache runs online policies only
        self.ready[load.slot] = self.copier.copy(self.pool[load.slot], self.masters[load.expert],
                                                 after=self.used[load.slot])
        self.copied_bytes += self.row_bytes
        return load.slot

    def prefetch(self, predicted: list[int]) -> None:
        """Start copying predicted experts (best first) before the step that may need them."""
        for load in self.policy.prefetch(predicted):
            self._load(load)

    def _score_prediction(self, topk_ids: torch.Tensor) -> None:
        if self.prediction is not None:
            predicted, self.prediction = self.prediction, None
            self.score(predicted, topk_ids)

    def score(self, predicted: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """Count the routings topk_ids [T, K] found among their token's predicted ids [T, K] (on the
        device: no sync)."""
        self.recall_found += (topk_ids[:, :, None] == predicted[:, None, :]).any(dim=-1).sum()
        self.recall_total += topk_ids.numel()


def predict_experts(cache: ExpertCache, block, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Block l's predicted top-k ids [T, K] from the residual stream x [B, S, H] entering it.

    Predictor (mixtral-offloading's speculative loading): layer l's own router, through layer l's
    ffn_norm, applied to the residual stream entering block l (= block l-1's output after its residual
    add; the embeddings for layer 0). It skips block l's attention, so it costs one RMSNorm and one
    [T, H] x [H, E] product, and the copies overlap that attention. Forced predictions (a recorded
    prefetch trace, next to a forced routing) replace it in benchmarks.
    """
    _refuse_capture(x)
    flat = x.reshape(-1, x.shape[-1])  # [T, H]
    if cache.forced_prediction is not None:
        return forced_route(cache.forced_prediction, flat.shape[0], block.moe.args.num_experts).topk_ids
    logits = block.moe.router(block.ffn_norm(flat)).float()  # [T, E]
    options = block.moe.route_options
    if options is not None and options.expert_mask is not None:  # pruned experts (issue 9) never run
        logits = logits.masked_fill(~options.expert_mask, float("-inf"))
    return torch.topk(logits, top_k, dim=-1).indices  # [T, K], route()'s top-k ids


def _prefetch_hook(cache: ExpertCache, block, top_k: int):
    """A forward pre-hook on block l starting the copies of its predicted experts before its attention."""

    def hook(module, args) -> None:
        predicted = predict_experts(cache, block, args[0], top_k)  # [T, K]
        # Host sync: the pool plans on the host. Rank-major (every token's first choice, then every
        # token's second, ...), the order cache-sim replays a step's predictions in.
        cache.prefetch(predicted.t().reshape(-1).tolist())
        cache.prediction = predicted
        if block.moe.observer is not None:
            block.moe.observer.predicted(block.moe.layer_index, predicted)

    return hook


@dataclass(frozen=True)
class ExpertCacheStats:
    """Counters since the pools were (re)configured; per-layer lists are [L].

    hits / misses: distinct experts needed per step and layer, resident or not (cache-sim's counters;
    under expert parallelism, parallel_buffering's: distinct local slots on this rank);
    prefetch_loads: copies issued by prefetch, useful or not; copied_bytes: every host-to-device byte;
    copy_seconds: the copy stream's busy time; stall_seconds: compute waiting for copies (CPU: all copy
    time); prefetch_recall: fraction of routings (token, layer, choice) predicted, None without prefetch
    (under expert parallelism: of this rank's token shard).
    """

    slots_per_layer: int
    policy: str
    prefetch: bool
    expert_bytes: int
    resident_bytes: int  # device slot memory, all layers
    hits: list[int]
    misses: list[int]
    prefetch_loads: list[int]
    evictions: list[int]
    copied_bytes: int
    copy_seconds: float
    stall_seconds: float
    prefetch_recall: float | None

    @property
    def total_hits(self) -> int:
        return sum(self.hits)

    @property
    def total_misses(self) -> int:
        return sum(self.misses)

    @property
    def miss_rate(self) -> float:
        return self.total_misses / max(self.total_hits + self.total_misses, 1)

    @property
    def copy_bytes_per_second(self) -> float | None:
        """Achieved host-to-device throughput while copying."""
        return self.copied_bytes / self.copy_seconds if self.copy_seconds > 0 else None

    def to_dict(self) -> dict:
        return asdict(self) | {"miss_rate": self.miss_rate, "copy_bytes_per_second": self.copy_bytes_per_second}


class ExpertBuffering:
    """The buffered experts of one model: the host masters, every layer's ExpertCache, the shared copier
    and the prefetch hooks. Built by enable_expert_buffering; reachable as `model.expert_buffering`."""

    def __init__(self, model, masters: list[list[torch.Tensor]], device: torch.device) -> None:
        self.model, self.masters, self.device = model, masters, device  # masters [L][E] host rows
        self.caches: list[ExpertCache] = []
        self._hooks: list = []
        self.slots_per_layer, self.policy, self.prefetch = 0, "", False
        self.predictions = None  # traces.Trace of forced predictions, or None: the router predicts

    def configure(self, slots_per_layer: int, policy: str, prefetch: bool) -> None:
        """(Re)build every layer's pool empty, with fresh counters, at a step boundary; masters stay.

        Benchmarks sweep slot counts and policies this way without re-pinning the masters.
        """
        args = self.model.args
        self._check_slots(slots_per_layer)
        self.close()
        copier = Copier(self.device)
        shape = (args.intermediate_size, args.hidden_size)
        self.caches = [ExpertCache(m, slots_per_layer, policy, shape, self.device, copier) for m in self.masters]
        self.copier, self.slots_per_layer, self.policy, self.prefetch = copier, slots_per_layer, policy, prefetch
        for layer, (block, cache) in enumerate(zip(self.model.layers, self.caches)):
            block.moe.expert_cache = cache
            if prefetch:
                self._hooks.append(block.register_forward_pre_hook(self._hook_for(layer, cache, block)))
        self.force_predictions(self.predictions)

    def _check_slots(self, slots_per_layer: int) -> None:
        """ConfigError unless one layer's pool size is usable (parallel_buffering bounds it per rank)."""
        args = self.model.args
        if not args.top_k <= slots_per_layer <= args.num_experts:
            raise ConfigError(f"expert_buffering: slots_per_layer={slots_per_layer} must be between "
                              f"top_k={args.top_k} and num_experts={args.num_experts}")

    def _hook_for(self, layer: int, cache: ExpertCache, block):
        """Block `layer`'s prefetch pre-hook (parallel_buffering maps the predictions to a rank's slots)."""
        return _prefetch_hook(cache, block, self.model.args.top_k)

    def force_predictions(self, trace) -> None:
        """Prefetch from a recorded prediction trace ([N, L', K], layers modulo, from its first token)
        instead of the router: with Transformer.force_routing, a full-width benchmark replays a small
        model's real routing and its real predictor. None gives the router back."""
        args = self.model.args
        self.predictions = trace
        for layer, cache in enumerate(self.caches):
            cache.forced_prediction = None if trace is None else ForcedRouting.from_trace(
                trace, layer, args.num_experts, args.top_k, self.device)

    def close(self) -> None:
        """Finish in-flight copies, drop the pools and the prefetch hooks (the masters stay)."""
        if self.caches:
            self.copier.settle(wait=True)
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.caches = [], []
        for block in self.model.layers:
            block.moe.expert_cache = None

    def stats(self, settle: bool = True) -> ExpertCacheStats:
        """Counters so far; settle=True waits for in-flight copies so the timings are complete."""
        self.copier.settle(wait=settle)
        pools = [c.policy for c in self.caches]
        scored = sum(c.recall_total for c in self.caches)
        found = int(sum(c.recall_found for c in self.caches)) if scored else 0
        return ExpertCacheStats(
            self.slots_per_layer, self.policy, self.prefetch, self.caches[0].row_bytes,
            sum(c.pool.numel() * c.pool.element_size() for c in self.caches),
            [p.hits for p in pools], [p.misses for p in pools], [p.prefetch_loads for p in pools],
            [p.evictions for p in pools], sum(c.copied_bytes for c in self.caches),
            self.copier.copy_seconds, self.copier.stall_seconds,
            found / scored if self.prefetch and scored else None,
        )


def enable_expert_buffering(model, config: ExpertBufferingConfig, device=None) -> ExpertBuffering | None:
    """Move every expert of `model` (a Transformer) to host masters and serve them from device slots.

    None when `config.enabled` is false. `device` (default: the model's) holds the slots; masters are
    pinned when it is a CUDA device. Expert weights still on the meta device are not copied: the caller
    fills `buffering.masters[layer][expert]` (one packed row each) before the first step.
    """
    if not config.enabled:
        return None
    check_bufferable(model)
    device = torch.device(device) if device is not None else model.output.weight.device
    slots = resolve_slots(config, model.args, model.layers[0].moe.w13.dtype)
    buffering = ExpertBuffering(model, host_masters(model, device), device)
    buffering.configure(slots, config.policy, config.prefetch)
    model.expert_buffering = buffering
    return buffering


def host_masters(model, device: torch.device) -> list[list[torch.Tensor]]:
    """Every expert of every layer packed into one host row [3FH] each, [L][E], pinned when `device` is
    CUDA; the model's own expert tensors are then emptied (device slots replace them)."""
    args = model.args
    dtype = model.layers[0].moe.w13.dtype
    f, h, e = args.intermediate_size, args.hidden_size, args.num_experts
    rows = _host_rows(args.num_layers * e, 3 * f * h, dtype, pin=device.type == "cuda")
    masters = [rows[layer * e : (layer + 1) * e] for layer in range(args.num_layers)]
    for block, layer_masters in zip(model.layers, masters):
        _pack(block.moe, layer_masters, device)
    return masters


def check_bufferable(model) -> None:
    """ConfigError unless `model` can buffer its experts: once, not behind a parallel hook already
    installed (expert parallelism buffers through parallel.ExpertParallel), with dynamic gating."""
    if model.expert_buffering is not None:
        raise ConfigError("expert buffering is already enabled on this model")
    if any(moe.parallel is not None for moe in model.moe_blocks):
        raise ConfigError("expert buffering cannot be added behind a parallel hook: under expert "
                          "parallelism pass expert_buffering to parallel.ExpertParallel (each rank buffers "
                          "its own slots); expert slicing does not buffer")
    if model.gating.mode != "dynamic":
        raise ConfigError(f"expert buffering runs the dynamic gating path; gating.mode is {model.gating.mode!r}")


def _pack(moe, masters: list[torch.Tensor], device: torch.device) -> None:
    """Copy one layer's experts into their host rows, then drop the device copies (slots replace them)."""
    f, h = moe.args.intermediate_size, moe.args.hidden_size
    if not moe.w13.is_meta:
        with torch.no_grad():
            for expert, row in enumerate(masters):
                row[: 2 * f * h].view(2 * f, h).copy_(moe.w13[expert])
                row[2 * f * h :].view(h, f).copy_(moe.w2[expert])
    dtype = moe.w13.dtype
    moe.w13 = nn.Parameter(torch.empty(0, 2 * f, h, dtype=dtype, device=device), requires_grad=False)
    moe.w2 = nn.Parameter(torch.empty(0, h, f, dtype=dtype, device=device), requires_grad=False)
