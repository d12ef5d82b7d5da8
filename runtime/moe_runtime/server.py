"""gRPC servicers: KServe OIP v2 inference, streaming Generation, ExpertControl (admin), health.

The only runtime module (with client.py) that imports grpc; it maps domain errors to status codes.
Client APIs and health listen on `serving.host:grpc_port`; ExpertControl on its own port, bound to
`admin_bind_address` (loopback unless asked). Runs on asyncio; the engine runs in its own thread.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from moe_runtime import __version__, oip
from moe_runtime.api.inference import grpc_service_pb2 as oip_pb
from moe_runtime.api.inference import grpc_service_pb2_grpc as oip_grpc
from moe_runtime.api.v1 import expert_control_pb2 as ec_pb
from moe_runtime.api.v1 import expert_control_pb2_grpc as ec_grpc
from moe_runtime.api.v1 import generation_pb2 as gen_pb
from moe_runtime.api.v1 import generation_pb2_grpc as gen_grpc
from moe_runtime.config import RuntimeConfig
from moe_runtime.control import ExpertController, StalePlacement
from moe_runtime.errors import CapacityExceeded, ConfigError, InvalidRequest, ModelNotReady
from moe_runtime.expert_cache import enable_expert_buffering
from moe_runtime.generate import SamplingParams
from moe_runtime.metrics import RuntimeMetrics
from moe_runtime.model import Transformer
from moe_runtime.parallel import ExpertParallel, Lockstep, ParallelConfig, init_group
from moe_runtime.placement import Placement, PlacementError, round_robin
from moe_runtime.routing_policy import apply_routing_policy
from moe_runtime.scheduler import Engine, Request, TokenEvent
from moe_runtime.tokenizer import Tokenizer, load_tokenizer
from moe_runtime.trace_recorder import TraceRecorder
from moe_runtime.weights import load_model

log = logging.getLogger(__name__)

_CODES = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    PlacementError: grpc.StatusCode.INVALID_ARGUMENT,
    CapacityExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
}
_FINISH = {"length": gen_pb.FINISH_REASON_LENGTH, "stop": gen_pb.FINISH_REASON_STOP,
           "cancelled": gen_pb.FINISH_REASON_CANCELLED}
SERVICES = ("inference.GRPCInferenceService", "moe_runtime.api.v1.Generation")


def status_code(exc: Exception) -> grpc.StatusCode:
    for kind, code in _CODES.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


@dataclass
class Serving:
    """What the servicers share. engine/control/tokenizer are set once weights are loaded."""

    model_name: str
    metrics: RuntimeMetrics
    health: health_aio.HealthServicer
    engine: Engine | None = None
    control: ExpertController | None = None
    tokenizer: Tokenizer | None = None

    @property
    def ready(self) -> bool:
        return self.control is not None and self.control.ready

    def require_ready(self) -> None:
        if not self.ready:
            raise ModelNotReady("model is loading or warming up")

    def check_model(self, name: str, version: str = "", field: str = "model_name") -> None:
        if name and name != self.model_name:
            raise InvalidRequest(f"{field}: unknown model {name!r} (serving {self.model_name!r})")
        if version not in ("", "1"):
            raise InvalidRequest(f"model_version: unknown version {version!r} (serving '1')")

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest("text input needs a tokenizer; this model has none: send token ids")
        return self.tokenizer.encode(text)


class _Mailbox:
    """Engine thread -> event loop: one wake-up per batch of events, not one per token and stream.

    Each call_soon_threadsafe writes the loop's self-pipe; at 32+ streams those wake-ups cost more than
    the tokens, so the engine's events of one step are handed over together."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self._lock = loop, threading.Lock()
        self._items: list[tuple[asyncio.Queue, TokenEvent]] = []

    def post(self, queue: asyncio.Queue, event: TokenEvent) -> None:
        with self._lock:
            self._items.append((queue, event))
            first = len(self._items) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, event in items:
            queue.put_nowait(event)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    if loop not in _MAILBOXES:
        _MAILBOXES[loop] = _Mailbox(loop)
    return _MAILBOXES[loop]


def _merge(first: TokenEvent, queue: asyncio.Queue) -> TokenEvent:
    """The event and whatever else already waits: one message for several tokens when the client lags."""
    tokens, event = list(first.token_ids), first
    while event.finish_reason is None and event.error is None and not queue.empty():
        event = queue.get_nowait()
        tokens += event.token_ids
    return TokenEvent(tokens, event.finish_reason, event.error)


class _Stream:
    """One submitted request as an async iterator of TokenEvents (engine thread -> event loop)."""

    def __init__(self, serving: Serving, prompt_ids: list[int], params: SamplingParams,
                 context: grpc.aio.ServicerContext, request_id: str = ""):
        serving.require_ready()
        self.loop = asyncio.get_running_loop()
        _mailbox(self.loop)  # created on the loop's thread, before the engine can post to it
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        self.request = Request(prompt_ids, params, self._sink, deadline=deadline, request_id=request_id)
        self.serving = serving
        serving.engine.submit(self.request)
        serving.metrics.prompt_tokens.inc(len(prompt_ids))

    def _sink(self, event: TokenEvent) -> None:
        _mailbox(self.loop).post(self.queue, event)

    async def events(self):
        last = None
        try:
            while True:
                event = _merge(await self.queue.get(), self.queue)
                if event.error is not None:
                    raise event.error
                if event.token_ids:
                    now = time.monotonic()
                    if last is None:
                        self.serving.metrics.ttft.observe(now - self.request.arrival)
                    else:
                        self.serving.metrics.itl.observe(now - last)
                    last = now
                    self.serving.metrics.generated_tokens.inc(len(event.token_ids))
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.request.cancel()  # the client went away or the call ended: free the slot now


class _TextTail:
    """Incremental detokenisation with stop strings: emits only text that can no longer change."""

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...]):
        self.tokenizer, self.stop, self.ids, self.sent = tokenizer, stop, [], ""

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """New text piece and whether a stop string ended the text."""
        if self.tokenizer is None:
            return "", False
        self.ids += ids
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            cut = text.find(s)
            if cut >= 0:
                piece, self.sent = text[len(self.sent):cut], text[:cut]
                return piece, True
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return "", False
        piece, self.sent = text[len(self.sent):], text
        return piece, False


async def _abort(context, exc: Exception):
    await context.abort(status_code(exc), str(exc))


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, serving: Serving):
        self.s = serving

    async def ServerLive(self, request, context):
        return oip_pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return oip_pb.ServerReadyResponse(ready=self.s.ready)

    async def ModelReady(self, request, context):
        try:
            self.s.check_model(request.name, request.version, "name")
        except InvalidRequest as exc:
            await _abort(context, exc)
        return oip_pb.ModelReadyResponse(ready=self.s.ready)

    async def ServerMetadata(self, request, context):
        return oip_pb.ServerMetadataResponse(name="moe-runtime", version=__version__, extensions=[])

    async def ModelMetadata(self, request, context):
        try:
            self.s.check_model(request.name, request.version, "name")
        except InvalidRequest as exc:
            await _abort(context, exc)
        meta = oip_pb.ModelMetadataResponse
        return meta(
            name=self.s.model_name, versions=["1"], platform="pytorch_moe",
            inputs=[meta.TensorMetadata(name=oip.INPUT_IDS, datatype="INT64", shape=[-1, -1]),
                    meta.TensorMetadata(name=oip.TEXT_INPUT, datatype="BYTES", shape=[-1])],
            outputs=[meta.TensorMetadata(name=oip.OUTPUT_IDS, datatype="INT64", shape=[-1, -1]),
                     meta.TensorMetadata(name=oip.TEXT_OUTPUT, datatype="BYTES", shape=[-1])],
        )

    async def ModelInfer(self, request, context):
        streams: list[_Stream] = []
        try:
            self.s.check_model(request.model_name, request.model_version)
            self.s.require_ready()
            call = oip.parse_infer_request(request, self.s.engine.serving.max_tokens_limit)
            prompts = [self.s.encode(p) if isinstance(p, str) else p for p in call.prompts]
            for ids in prompts:  # validate every row before any is queued: a bad row fails the call alone
                self.s.engine.validate(ids, call.params)
            streams = [_Stream(self.s, ids, call.params, context) for ids in prompts]
            results = await asyncio.gather(*(_collect(st, call.stop) for st in streams))
        except Exception as exc:
            for st in streams:
                st.request.cancel()
            self.s.metrics.requests.labels(status_code(exc).name).inc()
            await _abort(context, exc)
        self.s.metrics.requests.labels("OK").inc()
        texts = [t for _, t in results] if (call.text or self.s.tokenizer is not None) else None
        return oip.build_infer_response(self.s.model_name, request.id, [ids for ids, _ in results], texts)


async def _collect(stream: _Stream, stop: tuple[str, ...]) -> tuple[list[int], str]:
    tail, ids, text = _TextTail(stream.serving.tokenizer, stop), [], ""
    async for event in stream.events():
        ids += event.token_ids
        piece, stopped = tail.push(event.token_ids)
        text += piece
        if stopped:
            stream.request.cancel("stop")
            break
    return ids, text


class GenerationServicer(gen_grpc.GenerationServicer):
    def __init__(self, serving: Serving):
        self.s = serving

    def _start(self, request, context) -> tuple[_Stream, _TextTail]:
        self.s.check_model(request.model_name)
        self.s.require_ready()
        which = request.WhichOneof("prompt")
        if which is None:
            raise InvalidRequest("prompt: set text or prompt_ids")
        ids = self.s.encode(request.text) if which == "text" else list(request.prompt_ids.ids)
        params = SamplingParams(
            max_new_tokens=request.max_tokens if request.HasField("max_tokens") else 16,
            temperature=request.temperature,
            top_p=request.top_p if request.HasField("top_p") else 1.0,
            seed=request.seed if request.HasField("seed") else None,
            stop_token_ids=tuple(request.stop_token_ids), ignore_eos=request.ignore_eos,
            contrast_alpha=request.contrast_alpha,
        )
        stream = _Stream(self.s, ids, params, context, request.request_id)
        return stream, _TextTail(self.s.tokenizer, tuple(request.stop))

    async def _pieces(self, request, context):
        """(stream, new token ids, text piece, finish reason) per engine event; a stop string ends it."""
        stream, tail = self._start(request, context)
        async for event in stream.events():
            piece, stopped = tail.push(event.token_ids)
            yield stream, event.token_ids, piece, "stop" if stopped else event.finish_reason
            if stopped:
                stream.request.cancel("stop")
                return

    async def Generate(self, request, context):
        try:
            async for stream, ids, piece, reason in self._pieces(request, context):
                yield self._response(gen_pb.GenerateResponse, stream, ids, piece, reason)
        except Exception as exc:
            self.s.metrics.requests.labels(status_code(exc).name).inc()
            await _abort(context, exc)
        self.s.metrics.requests.labels("OK").inc()

    async def GenerateUnary(self, request, context):
        ids, text, reason, stream = [], "", None, None
        try:
            async for stream, new, piece, reason in self._pieces(request, context):  # noqa: B007
                ids += new
                text += piece
        except Exception as exc:
            self.s.metrics.requests.labels(status_code(exc).name).inc()
            await _abort(context, exc)
        self.s.metrics.requests.labels("OK").inc()
        return self._response(gen_pb.GenerateUnaryResponse, stream, ids, text, reason, total=True)

    def _response(self, kind, stream: _Stream, ids, text, reason, total: bool = False):
        req = stream.request
        msg = kind(request_id=req.request_id, token_ids=ids, text=text)
        if reason is not None:
            now = time.monotonic()
            msg.finish_reason = _FINISH[reason]
            msg.usage.prompt_tokens = len(req.prompt_ids)
            msg.usage.completion_tokens = len(req.output_ids)
            msg.timing.time_to_first_token_seconds = (req.first_token_time or now) - req.arrival
            msg.timing.total_seconds = now - req.arrival
        return msg


class ExpertControlServicer(ec_grpc.ExpertControlServicer):
    async def GetExpertLoad(self, request, context):
        try:
            self.s.require_ready()
        except ModelNotReady as exc:
            await _abort(context, exc)
        return await asyncio.to_thread(self.s.control.expert_load_message)

    async def GetPlacement(self, request, context):
        try:
            self.s.require_ready()
        except ModelNotReady as exc:
            await _abort(context, exc)
        return self.s.control.placement.to_proto()

    async def ApplyPlacement(self, request, context):
        try:
            self.s.require_ready()
            placement = Placement.from_proto(request.placement)
            unchanged, copied = await asyncio.to_thread(self.s.control.apply_placement, placement)
        except Exception as exc:
            await context.abort(_placement_code(exc), str(exc))
        return ec_pb.ApplyPlacementResponse(version=placement.version, unchanged=unchanged, copied_bytes=copied)

    def __init__(self, serving: Serving, drain):
        self.s, self._drain = serving, drain

    async def Drain(self, request, context):
        timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else 0.0
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(remaining - 0.05, 0.0))
        drained = await self._drain(timeout)
        in_flight = self.s.engine.in_flight() if self.s.engine is not None else 0
        return ec_pb.DrainResponse(in_flight=in_flight, drained=drained)


def _placement_code(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, StalePlacement):
        return grpc.StatusCode.FAILED_PRECONDITION
    return status_code(exc)


class RuntimeServer:
    """Lifecycle: bind ports, load weights, warm up, serve, drain, stop."""

    def __init__(self, config: RuntimeConfig, model: Transformer | None = None,
                 parallel: ParallelConfig | None = None):
        self.config, self._model, self.parallel = config, model, parallel
        self._lockstep: Lockstep | None = None
        self._recorder: TraceRecorder | None = None
        self.serving = Serving(config.served_model_name, RuntimeMetrics(), health_aio.HealthServicer())
        self.grpc_port = self.admin_port = self.metrics_port = 0
        self._draining = False

    async def start(self) -> None:
        """Bind and start the servers (health NOT_SERVING), then load, warm up and turn SERVING."""
        cfg = self.config.serving
        sys.setswitchinterval(cfg.switch_interval_ms / 1e3)  # process-wide: see ServingConfig
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server, self._admin, self.grpc_port, self.admin_port = build_servers(
            self.serving, cfg.host, cfg.grpc_port, cfg.admin_bind_address, cfg.admin_port, self.drain)
        await self._server.start()
        await self._admin.start()
        http, _ = start_http_server(cfg.metrics_port, addr=cfg.host, registry=self.serving.metrics.registry)
        self._http, self.metrics_port = http, http.server_port
        await asyncio.to_thread(self._load)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def _load(self) -> None:
        cfg = self.config
        model = self._model or load_model(cfg.model, device=cfg.device, dtype=getattr(torch, cfg.dtype),
                                          gating=cfg.gating, seed=cfg.seed)
        args = model.args
        if self.parallel is not None and cfg.routing.enabled:
            raise ConfigError("routing.adaptive_top_p and routing.prune_keep are not supported with expert parallelism")
        apply_routing_policy(model, cfg.routing)  # issue 9; before buffering, whose device slots it may spare
        self._buffer_and_record(model)
        world = self.parallel.world_size if self.parallel else 1
        placement = initial_placement(cfg, args, world)
        if self.parallel is None:
            engine = Engine(model, cfg.serving, on_step=self._observe_step)
            control = ExpertController(engine, placement)
        else:
            ep = ExpertParallel(model, placement, 0, world, buffering=cfg.expert_buffering)  # config errors first
            init_group(self.parallel)
            self._lockstep = lockstep = Lockstep(model, ep)
            lockstep.lead()
            engine = Engine(model, cfg.serving, on_step=self._observe_step, on_idle=lockstep.heartbeat,
                            on_error=_exit_group)
            control = ExpertController(engine, placement, world, lockstep)
        ckpt = Path(cfg.model) if Path(cfg.model).is_dir() else None
        self.serving.tokenizer = load_tokenizer(ckpt, args.vocab_size)
        self.serving.engine, self.serving.control = engine, control
        self.serving.metrics.watch_experts(lambda: control.slot_totals().tolist(),
                                           lambda: control.placement.version)
        engine.start()
        self._warm_up(engine)
        # What exists now (modules, weights' wrappers, graphs) lives as long as the process: keep it out
        # of the collector's full passes, which otherwise stall a step for tens of ms under load.
        gc.collect()
        gc.freeze()
        control.ready = True

    def _warm_up(self, engine: Engine) -> None:
        """The decode graphs captured, then one tiny request through the whole path; its expert counts
        are not load, so they are reset."""
        log.info("captured %d decode graphs", engine.capture_graphs())
        done = threading.Event()
        engine.submit(Request([0, 1], SamplingParams(max_new_tokens=2, ignore_eos=True),
                              lambda ev: done.set() if ev.finish_reason or ev.error else None))
        done.wait(timeout=600)
        with engine.lock:
            engine.model.reset_counters()

    def _buffer_and_record(self, model: Transformer) -> None:
        """Expert buffering and the routing trace (issue 5), both set up before the first step. Under
        expert parallelism each rank buffers its own slots: ExpertParallel sets that up."""
        cfg = self.config
        if self.parallel is not None and cfg.record_trace:
            raise ConfigError("record_trace is not supported with expert parallelism yet")
        if self.parallel is None:
            enable_expert_buffering(model, cfg.expert_buffering)
        self._recorder = TraceRecorder(model) if cfg.record_trace else None

    def _observe_step(self, engine: Engine) -> None:
        self.serving.metrics.queue_depth.set(engine.queue_depth())
        self.serving.metrics.running.set(engine.running())
        stats = engine.model.expert_cache_stats(settle=False)
        if stats is not None:
            self.serving.metrics.observe_expert_cache(stats.total_hits, stats.total_misses, stats.copied_bytes,
                                                      stats.stall_seconds)

    async def _set_health(self, status) -> None:
        for name in ("", *SERVICES):
            await self.serving.health.set(name, status)

    async def drain(self, timeout: float) -> bool:
        """Stop admitting (health NOT_SERVING), then wait up to `timeout` s for in-flight requests."""
        self._draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        engine = self.serving.engine
        if engine is None:
            return True
        engine.stop_accepting()
        return await asyncio.to_thread(engine.wait_idle, timeout)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.config.serving.drain_grace_seconds if grace is None else grace
        await self.drain(grace)
        await self._server.stop(1.0)
        await self._admin.stop(0)
        self._http.shutdown()
        engine = self.serving.engine
        if engine is not None:
            if self._lockstep is not None:  # followers leave their loop and exit 0
                engine.call_soon(self._lockstep.shutdown).result(timeout=30)
            engine.shutdown()
        if self._recorder is not None:
            self._recorder.save(self.config.record_trace)


def initial_placement(cfg: RuntimeConfig, args, world: int) -> Placement:
    """--placement FILE, else round-robin over the group's ranks."""
    if cfg.placement_file:
        placement = Placement.from_json(Path(cfg.placement_file).read_text())
    else:
        placement = round_robin(args.num_layers, args.num_experts, world)
    placement.validate(args.num_experts, args.num_layers)
    return placement


def _exit_group(exc: Exception) -> None:
    """A lost peer (or any failed collective) ends this rank; the operator restarts the group whole."""
    print(json.dumps({"event": "fatal", "error": repr(exc)}), flush=True)
    os._exit(3)


async def run_follower(config: RuntimeConfig, parallel: ParallelConfig) -> int:
    """Ranks > 0: health on the gRPC port, join the group, replay the leader's steps until shutdown."""
    cfg = config.serving
    health = health_aio.HealthServicer()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    def join() -> Lockstep:
        model = load_model(config.model, device=config.device, dtype=getattr(torch, config.dtype),
                           gating=config.gating, seed=config.seed)
        placement = initial_placement(config, model.args, parallel.world_size)
        ep = ExpertParallel(model, placement, parallel.rank, parallel.world_size, buffering=config.expert_buffering)
        init_group(parallel)  # after the config errors ExpertParallel may raise, as on the leader
        return Lockstep(model, ep)

    lockstep = await asyncio.to_thread(join)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    print(json.dumps({"event": "following", "rank": parallel.rank, "grpc_port": port}), flush=True)
    try:
        await asyncio.to_thread(lockstep.follow)
    except Exception as exc:
        _exit_group(exc)
    await server.stop(0)
    print(json.dumps({"event": "stopped", "rank": parallel.rank}), flush=True)
    return 0


async def run_until_signalled(config: RuntimeConfig, parallel: ParallelConfig | None = None) -> None:
    """`moe-runtime serve`: serve until SIGTERM/SIGINT, then drain within the grace period."""
    server = RuntimeServer(config, parallel=parallel)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(json.dumps({"event": "serving", "model": server.serving.model_name, "grpc_port": server.grpc_port,
                      "admin_port": server.admin_port, "metrics_port": server.metrics_port}), flush=True)
    await stop.wait()
    await server.stop()
    print(json.dumps({"event": "stopped"}), flush=True)


def build_servers(serving: Serving, host: str, port: int, admin_host: str, admin_port: int, drain):
    """(client server, admin server, bound client port, bound admin port); not started."""
    server = grpc.aio.server()
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(serving), server)
    gen_grpc.add_GenerationServicer_to_server(GenerationServicer(serving), server)
    health_pb2_grpc.add_HealthServicer_to_server(serving.health, server)
    names = (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    admin = grpc.aio.server()
    ec_grpc.add_ExpertControlServicer_to_server(ExpertControlServicer(serving, drain), admin)
    admin_bound = admin.add_insecure_port(f"{admin_host}:{admin_port}")
    return server, admin, bound, admin_bound
