"""gRPC servicers: KServe OIP v2 inference, streaming Generation, ExpertControl (admin), health wiring.

Owns the wire side of a request: parsing and validation into the engine's Requests, one stream of
TokenEvents per request from the engine thread to the event loop, incremental text with stop strings,
domain errors mapped to status codes, and the two grpc.aio servers (client APIs with health and
reflection; ExpertControl on its own port). server.py owns the lifecycle around them.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from moe_runtime import __version__, oip
from moe_runtime.api.inference import grpc_service_pb2 as oip_pb
from moe_runtime.api.inference import grpc_service_pb2_grpc as oip_grpc
from moe_runtime.api.v1 import expert_control_pb2 as ec_pb
from moe_runtime.api.v1 import expert_control_pb2_grpc as ec_grpc
from moe_runtime.api.v1 import generation_pb2 as gen_pb
from moe_runtime.api.v1 import generation_pb2_grpc as gen_grpc
from moe_runtime.control import ExpertController, StalePlacement
from moe_runtime.errors import CapacityExceeded, InvalidRequest, ModelNotReady
from moe_runtime.generate import SamplingParams
from moe_runtime.metrics import RuntimeMetrics
from moe_runtime.placement import Placement, PlacementError
from moe_runtime.scheduler import Engine, Request, TokenEvent
from moe_runtime.tokenizer import Tokenizer

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
