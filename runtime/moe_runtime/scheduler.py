"""Continuous batching: a bounded request queue and the engine loop that runs the model.

Requests join the running batch (prefill into a free KV-cache row) and leave it (finish, stop, cancel,
deadline) at decode-step boundaries; waiting prompts prefill together (generate.prefill_batch). One
step stays in flight: the engine launches step N+1 from the device-side ids of step N, then reads step N's
ids (pinned, behind an event) and hands them out while N+1 runs, so the host's per-token work overlaps
the device. A request that ends that way had one more token launched, which is dropped. One engine
thread owns the model; callers talk to it through `Engine.submit()` and each request's `sink`. No gRPC
here: servicers.py adapts this to the wire.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from moe_runtime.config import ServingConfig
from moe_runtime.cuda_graphs import capture_decode_graphs
from moe_runtime.errors import CapacityExceeded, InvalidRequest, ModelNotReady
from moe_runtime.generate import (
    DecodeOutput,
    SamplingParams,
    decode,
    make_generator,
    next_tokens,
    prefill,
    prefill_batch,
    to_device,
    validate_prompt,
)
from moe_runtime.model import Transformer


@dataclass
class TokenEvent:
    """What a request's sink receives: new token ids, and at the end a finish reason or an error."""

    token_ids: list[int]
    finish_reason: str | None = None  # "length" | "stop" | "cancelled"
    error: Exception | None = None


class _Readback:
    """One launch's next ids [n] for `requests`, on their way to the host: on CUDA a non-blocking copy
    into pinned memory and an event, so the host reads them while the next launch runs."""

    def __init__(self, requests: list[Request], device_ids: torch.Tensor):
        self.requests, self.device_ids = requests, device_ids
        if device_ids.is_cuda:
            self._host = torch.empty(device_ids.shape, dtype=device_ids.dtype, pin_memory=True)
            self._host.copy_(device_ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = device_ids, None

    def ids(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[TokenEvent], None]
    deadline: float | None = None  # time.monotonic() seconds
    request_id: str = ""
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    _stop_reason: str | None = None
    _generator: torch.Generator | None = None
    _stop_ids: frozenset[int] = frozenset()  # the request's stop ids and, unless ignore_eos, the model's eos
    _in_flight: int = 0  # tokens launched on the device and not yet handed out
    _last: tuple[_Readback, int] | None = None  # where the newest in-flight token is: (launch, row)
    _finished: bool = False

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to end this request at the next step boundary (thread-safe flag)."""
        if self._stop_reason is None:
            self._stop_reason = reason

    @property
    def position(self) -> int:
        """Cache position of the last emitted token (the next decode input)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1


class Engine:
    """Owns the model and its KV cache; runs prefill/decode steps in its own thread."""

    def __init__(
        self,
        model: Transformer,
        serving: ServingConfig,
        on_step: Callable[[Engine], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
        idle_seconds: float = 1.0,
        cuda_graphs: bool = True,
    ):
        """on_step: after every step (metrics). on_idle: every `idle_seconds` without work (the
        expert-parallel heartbeat). on_error: a step failed (default: fail the requests in flight).
        cuda_graphs: decode steps replay captured CUDA graphs where they apply (generate.decode)."""
        self.model, self.serving, self.cuda_graphs = model, serving, cuda_graphs
        self._on_idle, self._on_error, self._idle_seconds = on_idle, on_error, idle_seconds
        self._tasks: deque[tuple[Callable[[], object], Future]] = deque()
        self.max_seq_len = min(serving.max_seq_len, model.args.max_seq_len)
        model.setup_cache(serving.max_running_sequences, self.max_seq_len)
        self.device = model.output.weight.device
        self.stop_ids = frozenset({model.args.eos_token_id} - {None})
        self.lock = threading.Lock()  # guards the model between the engine thread and readers
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._free_slots = list(range(serving.max_running_sequences))
        self._ids = itertools.count()
        self._accepting, self._stopped = True, False
        self._on_step = on_step
        self._launched: _Readback | None = None  # the last decode launch: handed out in the next step
        self._thread = threading.Thread(target=self._loop, name="moe-engine", daemon=True)

    # ---- caller side -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> Request:
        """Validate and queue a request; raises InvalidRequest, CapacityExceeded or ModelNotReady."""
        self.validate(request.prompt_ids, request.params)
        with self._cv:
            if not self._accepting:
                raise ModelNotReady("server is draining: not accepting new requests")
            if len(self._waiting) >= self.serving.max_queue:
                raise CapacityExceeded(f"request queue is full ({self.serving.max_queue} waiting)")
            request.request_id = request.request_id or f"req-{next(self._ids)}"
            if request.params.temperature > 0:
                request._generator = make_generator(request.params.seed, self.device)
            eos = frozenset() if request.params.ignore_eos else self.stop_ids
            request._stop_ids = frozenset(request.params.stop_token_ids) | eos
            self._waiting.append(request)
            self._cv.notify()
        return request

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        params.validate()
        if params.max_new_tokens > self.serving.max_tokens_limit:
            raise InvalidRequest(f"max_tokens {params.max_new_tokens} exceeds the server limit "
                                 f"{self.serving.max_tokens_limit}")
        validate_prompt(prompt_ids, params, self.model)
        if len(prompt_ids) + params.max_new_tokens > self.max_seq_len:
            raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_new_tokens}) "
                                 f"exceeds the server's max_seq_len {self.max_seq_len}")

    def call_soon(self, fn: Callable[[], object]) -> Future:
        """Run `fn` in the engine thread between steps (collectives must keep the step order)."""
        future: Future = Future()
        with self._cv:
            if self._stopped:
                future.set_exception(ModelNotReady("engine stopped"))
                return future
            self._tasks.append((fn, future))
            self._cv.notify()
        return future

    def capture_graphs(self) -> int:
        """Capture the decode graphs of every batch bucket now, in the engine thread (a server does this
        while it warms up, before it reports SERVING); returns how many exist (0 without graphs)."""
        if not self.cuda_graphs:
            return 0
        return self.call_soon(lambda: capture_decode_graphs(self.model)).result()

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    def in_flight(self) -> int:
        with self._cv:
            return len(self._waiting) + len(self._running)

    def queue_depth(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self._running)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is waiting or running (drain), or the timeout passes."""
        end = time.monotonic() + timeout
        with self._cv:
            while self._waiting or self._running:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    def shutdown(self) -> None:
        """Stop the loop; requests still present are ended as cancelled."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # ---- engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                idle = False
                while not (self._stopped or self._waiting or self._running or self._tasks):
                    if not self._cv.wait(self._idle_seconds):
                        idle = True
                        break
                if self._stopped:
                    break
            try:
                if idle and self._on_idle is not None:
                    with self.lock:
                        self._on_idle()
                else:
                    self.step()
            except Exception as exc:  # a failed step must not leave callers hanging
                self._fail_all(exc)
                if self._on_error is not None:
                    self._on_error(exc)
        self._fail_all(None)

    def _run_tasks(self) -> None:
        while True:
            with self._cv:
                if not self._tasks:
                    return
                fn, future = self._tasks.popleft()
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def step(self) -> None:
        """One engine step: drop ended requests, admit new ones (prefill), launch the running batch's
        decode, then hand out the tokens of the step before it while this one runs on the device."""
        with self.lock:
            if self._tasks:
                self._settle()  # a control op sees every launched step done and handed out
                self._run_tasks()
            self._retire_ended()
            first = self._admit()
            launched = self._launch_decode()
            if self._launched is not None:
                self._hand_out(self._launched)
            if first is not None:
                self._hand_out(first)
            self._launched = launched
            self._retire_ended()
        if self._on_step is not None:
            self._on_step(self)
        with self._cv:
            self._cv.notify_all()

    def _settle(self) -> None:
        if self._launched is not None:
            self._hand_out(self._launched)
            self._launched = None
            self._retire_ended()

    def _admit(self) -> _Readback | None:
        """Prefill waiting requests into free rows within the step's token budget; their first tokens
        stay on the device (a readback on its way to the host)."""
        budget = self.serving.max_batch_tokens - len(self._running)
        admitted: list[Request] = []
        while self._free_slots:
            with self._cv:
                if not self._waiting:
                    break
                req = self._waiting[0]
                # A long prompt alone in a step always makes progress, even over the budget.
                if admitted and len(req.prompt_ids) > budget:
                    break
                self._waiting.popleft()
            if req._stop_reason is not None or self._expired(req):
                self._finish(req, req._stop_reason or "cancelled")
                continue
            req.slot = self._free_slots.pop(0)
            self._running.append(req)
            budget -= len(req.prompt_ids)
            admitted.append(req)
        if not admitted:
            return None
        logits = torch.cat([self._prefill(group) for group in self._prefill_groups(admitted)])
        return self._sampled(admitted, DecodeOutput(logits))

    def _prefill_groups(self, admitted: list[Request]) -> list[list[Request]]:
        """Consecutive requests that prefill together: one forward each group, right-padded, while the
        padding stays below the real tokens and the padded size within max_batch_tokens. Requests that
        need their own forward (SCMoE, expert-parallel leaders) are groups of one."""
        alone = self.model.step_hook is not None
        groups: list[list[Request]] = []
        for req in admitted:
            group = groups[-1] if groups else None
            if group and not alone and req.params.contrast_alpha == 0 and group[0].params.contrast_alpha == 0:
                longest = max(len(req.prompt_ids), *(len(r.prompt_ids) for r in group))
                real = len(req.prompt_ids) + sum(len(r.prompt_ids) for r in group)
                padded = longest * (len(group) + 1)
                if padded <= max(2 * real, 1) and padded <= self.serving.max_batch_tokens:
                    group.append(req)
                    continue
            groups.append([req])
        return groups

    def _prefill(self, group: list[Request]) -> torch.Tensor:
        """Logits [len(group), V] of each request's last prompt token."""
        if len(group) == 1:
            req = group[0]
            return prefill(self.model, req.prompt_ids, req.slot, contrast_alpha=req.params.contrast_alpha)[None]
        return prefill_batch(self.model, [r.prompt_ids for r in group], [r.slot for r in group])

    def _launch_decode(self) -> _Readback | None:
        """Decode every running request that still needs a token, its input token taken on the device
        from the launch that made it (no host read): the launch before is still in flight."""
        batch = [r for r in self._running if r._stop_reason is None
                 and len(r.output_ids) + r._in_flight < r.params.max_new_tokens]
        if not batch:
            return None
        out = decode(self.model, self._last_tokens(batch), [r.position + r._in_flight for r in batch],
                     [r.slot for r in batch], cuda_graphs=self.cuda_graphs,
                     contrast_alphas=[r.params.contrast_alpha for r in batch])
        return self._sampled(batch, out)

    def _last_tokens(self, batch: list[Request]) -> torch.Tensor:
        """Each request's newest token [B] on the device: from the launch that made it, or the host."""
        sources: list[torch.Tensor] = []
        offsets: dict[int, int] = {}  # id(readback) -> where its ids start in the concatenation
        total, index, host = 0, [], []
        for req in batch:
            if req._last is None:  # read already: the host has it
                index.append(None)
                host.append(req.output_ids[-1])
                continue
            readback, i = req._last
            if id(readback) not in offsets:
                offsets[id(readback)] = total
                sources.append(readback.device_ids)
                total += len(readback.device_ids)
            index.append(offsets[id(readback)] + i)
        if host:
            sources.append(to_device(host, self.device))
            tail = iter(range(total, total + len(host)))
            index = [next(tail) if i is None else i for i in index]
        table = sources[0] if len(sources) == 1 else torch.cat(sources)
        if index == list(range(len(table))):
            return table
        return table.index_select(0, to_device(index, self.device))

    def _sampled(self, batch: list[Request], out: DecodeOutput) -> _Readback:
        ids = next_tokens(out, [r.params.temperature for r in batch], [r.params.top_p for r in batch],
                          [r._generator for r in batch])
        readback = _Readback(batch, ids)
        for i, req in enumerate(batch):
            req._in_flight += 1
            req._last = (readback, i)
        return readback

    def _hand_out(self, readback: _Readback) -> None:
        """The host reads a launch's tokens (waiting for it if needed) and gives each request its token."""
        now = time.monotonic()
        for req, tok in zip(readback.requests, readback.ids()):
            if req._finished:  # ended while this token was in flight: it was never wanted
                continue
            req._in_flight -= 1
            if req._last is not None and req._last[0] is readback:
                req._last = None
            req.output_ids.append(tok)
            req.first_token_time = req.first_token_time or now
            if tok in req._stop_ids:
                req._stop_reason = req._stop_reason or "stop"
            elif len(req.output_ids) >= req.params.max_new_tokens:
                req._stop_reason = req._stop_reason or "length"
            req.sink(TokenEvent([tok]))

    def _expired(self, req: Request) -> bool:
        return req.deadline is not None and time.monotonic() > req.deadline

    def _retire_ended(self) -> None:
        for req in list(self._running):
            if self._expired(req):
                req.cancel("cancelled")
            if req._stop_reason is not None:
                self._running.remove(req)
                self._free_slots.append(req.slot)
                self._finish(req, req._stop_reason)

    def _finish(self, req: Request, reason: str | None, error: Exception | None = None) -> None:
        req._finished = True
        req.sink(TokenEvent([], finish_reason=reason, error=error))

    def _fail_all(self, error: Exception | None) -> None:
        with self._cv:
            pending = list(self._waiting) + list(self._running)
            for _, future in self._tasks:
                future.set_exception(error or ModelNotReady("engine stopped"))
            self._tasks.clear()
            self._launched = None
            self._waiting.clear()
            self._running.clear()
            self._free_slots = list(range(self.serving.max_running_sequences))
            self._cv.notify_all()
        for req in pending:
            self._finish(req, "cancelled" if error is None else None, error)

    def expert_load(self) -> torch.Tensor:
        """Cumulative token-slots per (layer, expert) [L, E] on the host (reads between steps)."""
        with self.lock:
            return self.model.expert_load().cpu()
