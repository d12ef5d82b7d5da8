"""The runtime server's lifecycle: bind, load weights, warm up, serve, drain, stop; expert-parallel ranks.

Client APIs and health listen on `serving.host:grpc_port`; ExpertControl on its own port, bound to
`admin_bind_address` (loopback unless asked). Runs on asyncio; the engine runs in its own thread. The
servicers and the wire side of a request are servicers.py's; those two and client.py are the only runtime
modules that import grpc.
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
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import start_http_server

from moe_runtime.config import RuntimeConfig
from moe_runtime.control import ExpertController
from moe_runtime.errors import ConfigError
from moe_runtime.expert_cache import enable_expert_buffering
from moe_runtime.generate import SamplingParams
from moe_runtime.metrics import RuntimeMetrics
from moe_runtime.model import Transformer
from moe_runtime.parallel import ExpertParallel, Lockstep, ParallelConfig, init_group
from moe_runtime.placement import Placement, round_robin
from moe_runtime.routing_policy import apply_routing_policy
from moe_runtime.scheduler import Engine, Request
from moe_runtime.servicers import SERVICES, Serving, build_servers
from moe_runtime.tokenizer import load_tokenizer
from moe_runtime.trace_recorder import TraceRecorder
from moe_runtime.weights import load_model

log = logging.getLogger(__name__)


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
