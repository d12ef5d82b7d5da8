"""Expert parallelism over W GPUs (issue 10): tokens/s of Mixtral-8x7B-shaped MoE layers against one GPU, and
balance and time per forward under skewed routing before and after a live re-placement.

A script beside bench/ep.py (which keeps the W=1 overhead of the EP code path). It spawns W processes, one GPU
each (NCCL, NVLink multicast off; gloo on the CPU with --quick), attention-free. The runtime's EP shards a batch
that every rank holds, so every rank gets the same [W*T, H] batch and routes and runs its own T tokens.
Rank 0 writes DIR/ep_multi.json after each phase, the parent DIR/ep_multi.md; collectives time out, ranks die at
a deadline. `--gating static --capacity-fraction F` runs fairseq's capacity path instead, on one GPU and under
EP (parallel_static.py: equal-split all_to_alls, replicas idle), into DIR/ep_multi_static_fF.*. Not measured:
whole-model prefill/decode.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

import moe_runtime.parallel as parallel_module  # noqa: E402
import moe_runtime.parallel_static as parallel_static_module  # noqa: E402
from moe_runtime.config import GatingConfig  # noqa: E402
from moe_runtime.model import ModelArgs  # noqa: E402
from moe_runtime.parallel import ExpertParallel, Lockstep, ParallelConfig, init_group  # noqa: E402
from moe_runtime.placement import (  # noqa: E402
    expert_load_from_slots,
    greedy,
    imbalance,
    rank_loads,
    rank_loads_from_slots,
    replicate_pack,
    round_robin,
)
from moe_runtime.weights import init_random  # noqa: E402

# T tokens per rank, W ranks, H hidden, E experts, K top-k, L layers, S slots per rank, P = W*S physical slots

GROUP_TIMEOUT_S = 120  # rendezvous and every collective; NCCL's watchdog ends a rank stuck longer
ZIPF_BIAS = 1.0  # router bias of expert e: -ZIPF_BIAS * ln(e + 1) logit std; top-2 shares ~0.36, 0.22, 0.14, ...
PLANNERS = ("greedy", "replicate_pack")  # applied in this order after round_robin, from one observed load
WARMUP = 3  # untimed forwards before each timing


@dataclass(frozen=True)
class Settings:
    preset: str
    layers: int
    tokens: tuple[int, ...]  # T per rank, uniform routing
    skew_tokens: int  # T per rank, skewed routing
    reps: int
    device: str  # "cuda" (one GPU per rank) or "cpu"
    dtype: str
    backend: str
    gating: str = "dynamic"
    capacity_fraction: float = 1.0  # static gating only

    @classmethod
    def for_mode(cls, quick: bool, layers: int, gating: str = "dynamic", capacity_fraction: float = 1.0) -> Settings:
        if quick:
            return cls("tiny", layers, (1, 8, 64), 64, 5, "cpu", "float32", "gloo", gating, capacity_fraction)
        return cls("mixtral-8x7b", layers, (1, 64, 512, 4096), 4096, 20, "cuda", "bfloat16", "nccl", gating,
                   capacity_fraction)

    @property
    def stem(self) -> str:
        """Output file name: ep_multi (dynamic) or ep_multi_static_f0.25."""
        return "ep_multi" if self.gating == "dynamic" else f"ep_multi_static_f{self.capacity_fraction:g}"


# -- timing ----------------------------------------------------------------------------------------------


def _mark(device: torch.device):
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed_ms(start, end) -> float:
    if isinstance(start, float):
        return (end - start) * 1e3
    end.synchronize()
    return start.elapsed_time(end)


def _time(fn, device: torch.device, reps: int) -> float:
    """Median ms of `fn()` over `reps` runs after WARMUP runs (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(WARMUP):
        fn()
    samples = []
    for _ in range(reps):
        start = _mark(device)
        fn()
        samples.append(_elapsed_ms(start, _mark(device)))
    return sorted(samples)[len(samples) // 2]


class CollectiveClock:
    """Stands in for parallel.py's and parallel_static.py's `dist` during one extra pass: ExpertParallel.forward has no seam between its
    collectives and its compute, so this times each all_to_all_single / all_gather call (CUDA events on the
    current stream, so a span includes waiting for the slower rank)."""

    TIMED = ("all_to_all_single", "all_gather")

    def __init__(self, device: torch.device):
        self.device, self.spans = device, []

    def __getattr__(self, name: str):
        fn = getattr(dist, name)
        return (lambda *a, **k: self._timed(fn, a, k)) if name in self.TIMED else fn

    def _timed(self, fn, a, k):
        start = _mark(self.device)
        out = fn(*a, **k)
        self.spans.append((start, _mark(self.device)))
        return out


def _collective_ms(fn, device: torch.device, reps: int) -> float | None:
    """Median ms per `fn()` spent inside the EP collectives; None if parallel.py no longer calls them through
    its `dist`."""
    clock = CollectiveClock(device)
    parallel_module.dist = parallel_static_module.dist = clock
    totals = []
    try:
        for _ in range(reps):
            clock.spans = []
            fn()
            totals.append(sum(_elapsed_ms(s, e) for s, e in clock.spans))
    finally:
        parallel_module.dist = parallel_static_module.dist = dist
    return sorted(totals)[len(totals) // 2] if clock.spans else None


def _all_ranks(value: float | None, comm: torch.device) -> list[float | None]:
    """Every rank's `value` (an all_gather, so all ranks call it)."""
    t = torch.tensor([np.nan if value is None else value], dtype=torch.float64, device=comm)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return [None if np.isnan(v) else round(v, 4) for v in torch.cat(parts).tolist()]


# -- phases ----------------------------------------------------------------------------------------------


def _batch(n: int, args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[n, H], the same on every rank (same seed, same device type)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, args.hidden_size, generator=gen, device=device, dtype=dtype)


def _forward(blocks, x: torch.Tensor) -> None:
    for moe in blocks:  # attention-free: every layer routes the same batch
        moe(x)


def _plain_rows(blocks, args, cfg: Settings, world: int, device, dtype) -> list[dict]:
    """The same layers on one GPU without EP (each rank on its own GPU, no collectives; rank 0's are reported):
    the group's W*T tokens, and this rank's T alone (every GPU holding every expert, no communication)."""
    rows = []
    for t in cfg.tokens:
        x = _batch(world * t, args, device, dtype, seed=t)
        rows.append({"tokens_per_rank": t, "group_tokens": world * t,
                     "plain_ms": _time(lambda x=x: _forward(blocks, x), device, cfg.reps),
                     "plain_rank_batch_ms": _time(lambda x=x[:t]: _forward(blocks, x), device, cfg.reps)})
    return rows


def _ep_rows(blocks, rows: list[dict], args, cfg: Settings, device, dtype, comm) -> None:
    for row in rows:
        x = _batch(row["group_tokens"], args, device, dtype, seed=row["tokens_per_rank"])
        ms = _all_ranks(_time(lambda x=x: _forward(blocks, x), device, cfg.reps), comm)
        coll = _all_ranks(_collective_ms(lambda x=x: _forward(blocks, x), device, cfg.reps), comm)
        step = max(ms)  # the group steps together: its slowest rank sets the time
        row.update(ep_ms=step, ep_ms_by_rank=ms, collective_ms_by_rank=coll,
                   ep_tokens_per_s=row["group_tokens"] / step * 1e3,
                   one_gpu_tokens_per_s=row["group_tokens"] / row["plain_ms"] * 1e3,
                   speedup=row["plain_ms"] / step)


def _skew_routers(blocks, x: torch.Tensor) -> list[list[float]]:
    """Deterministic ~Zipf load: each router keeps its weights and gets a bias of -ZIPF_BIAS * ln(e + 1) times
    its logits' std on `x` (expert 0 hottest; round_robin puts the hottest experts together on rank 0)."""
    bias = []
    for moe in blocks:
        old = moe.router
        sigma = float(old(x).float().std())
        new = torch.nn.Linear(old.in_features, old.out_features, bias=True,
                              device=old.weight.device, dtype=old.weight.dtype)
        values = -ZIPF_BIAS * sigma * torch.log(torch.arange(1, old.out_features + 1, dtype=torch.float64))
        new.weight.copy_(old.weight)
        new.bias.copy_(values)
        new.requires_grad_(False)
        moe.router = new
        bias.append([round(v, 4) for v in values.tolist()])
    return bias


def _slot_load(ep: ExpertParallel) -> np.ndarray:
    """[L, P] cumulative token-slots per physical slot, rank-major (an all_gather: all ranks call it)."""
    per_rank = ep.gather_slot_load()  # [W, L, S]
    return per_rank.permute(1, 0, 2).reshape(per_rank.shape[1], -1).numpy()


def _measure(ep: ExpertParallel, blocks, x: torch.Tensor, cfg: Settings, device, comm) -> dict:
    """Token-slots per rank per forward, imbalance and time per forward under the placement in force."""
    before = _slot_load(ep)
    ms = _all_ranks(_time(lambda: _forward(blocks, x), device, cfg.reps), comm)
    per_rank = rank_loads_from_slots(ep.placement, _slot_load(ep) - before) / (WARMUP + cfg.reps)  # [L, W]
    coll = _all_ranks(_collective_ms(lambda: _forward(blocks, x), device, cfg.reps), comm)
    return {"slots_per_rank": ep.placement.slots_per_rank, "rank_token_slots": per_rank.tolist(),
            "imbalance": imbalance(per_rank), "balancedness": 1.0 / imbalance(per_rank),
            "ep_ms": max(ms), "ep_ms_by_rank": ms, "collective_ms_by_rank": coll,
            "tokens_per_s": x.shape[0] / max(ms) * 1e3}


def _switch(model, ep: ExpertParallel, placement, rank: int) -> tuple[float, int]:
    """Switch every rank at this step boundary as the runtime does (Lockstep.apply: the leader broadcasts the
    placement, each rank copies its new experts from its host store, an all_reduce of the bytes ends it).
    (seconds on the leader, bytes copied over the group); followers return zeros."""
    lockstep = Lockstep(model, ep)
    if rank != 0:
        lockstep.follow()  # applies, then returns at the leader's shutdown
        return 0.0, 0
    start = time.perf_counter()
    copied = lockstep.apply(placement)
    seconds = time.perf_counter() - start
    lockstep.shutdown()
    return seconds, copied


def _skew(model, ep, args, cfg: Settings, rank: int, device, dtype, comm, report) -> dict:
    """Round-robin under skewed routers, then each planner's placement from the load observed on another batch,
    applied live; `report(section)` after each placement."""
    blocks, world = model.moe_blocks, ep.world_size
    fit = _batch(world * cfg.skew_tokens, args, device, dtype, seed=1001)
    held_out = _batch(world * cfg.skew_tokens, args, device, dtype, seed=1002)
    section = {"tokens_per_rank": cfg.skew_tokens, "router_bias": _skew_routers(blocks, fit), "placements": []}
    before = _slot_load(ep)
    _forward(blocks, fit)  # one forward: the planners' noise margins read the load as token-slot counts
    observed = expert_load_from_slots(ep.placement, _slot_load(ep) - before, args.num_experts)  # [L, E]
    section["observed_expert_load"] = observed.tolist()
    s = ep.placement.slots_per_rank
    plans = {"greedy": greedy(observed, world, s, version=1),  # the paper's, no replicas
             "replicate_pack": replicate_pack(observed, world, s + 1, version=2)}  # one redundant slot per rank
    rows = section["placements"]
    rows.append({"planner": "round_robin", "placement": ep.placement.to_dict(),
                 **_measure(ep, blocks, held_out, cfg, device, comm)})
    report(section)
    for name in PLANNERS:
        seconds, copied = _switch(model, ep, plans[name] if rank == 0 else None, rank)
        row = {"planner": name, "switch_s": seconds, "copied_bytes": copied,
               "predicted_imbalance": imbalance(rank_loads(plans[name], observed)),
               "placement": plans[name].to_dict(), **_measure(ep, blocks, held_out, cfg, device, comm)}
        row["speedup_vs_round_robin"] = rows[0]["ep_ms"] / row["ep_ms"]
        rows.append(row)
        report(section)
    return section


# -- one rank --------------------------------------------------------------------------------------------


def _meta(args: ModelArgs, cfg: Settings, world: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    version = torch.cuda.nccl.version() if cuda else None  # a tuple in recent torch, an int in older ones
    nccl = ".".join(map(str, version)) if isinstance(version, tuple) else version
    return {"complete": False, "world": world, "backend": cfg.backend, "torch": torch.__version__, "nccl": nccl,
            "devices": [torch.cuda.get_device_name(r) for r in range(world)] if cuda else ["cpu"] * world,
            "dtype": cfg.dtype, "settings": asdict(cfg), "shape": args.to_dict()}


def _run(rank: int, world: int, cfg: Settings, device: torch.device, out: Path) -> None:
    dtype = getattr(torch, cfg.dtype)
    comm = device if cfg.backend == "nccl" else torch.device("cpu")
    args = ModelArgs.from_name(cfg.preset).with_(num_layers=cfg.layers, vocab_size=512)
    started = time.perf_counter()
    model = init_random(args, device=device, dtype=dtype, gating=GatingConfig(cfg.gating, cfg.capacity_fraction))
    result = _meta(args, cfg, world, device)
    result["model_init_s"] = time.perf_counter() - started

    def report(section: str, value) -> None:
        result[section] = value
        if rank == 0:
            (out / f"{cfg.stem}.json").write_text(json.dumps(result, indent=2))

    rows = _plain_rows(model.moe_blocks, args, cfg, world, device, dtype)
    setup = time.perf_counter()
    ep = ExpertParallel(model, round_robin(args.num_layers, args.num_experts, world), rank, world)
    result["ep_setup_s"] = time.perf_counter() - setup
    _ep_rows(model.moe_blocks, rows, args, cfg, device, dtype, comm)
    report("throughput", rows)
    _skew(model, ep, args, cfg, rank, device, dtype, comm, lambda section: report("skew", section))
    result["complete"] = True
    result["wall_s"] = time.perf_counter() - started
    report("skew", result["skew"])


def _worker(rank: int, world: int, cfg: Settings, out: str, store: str, deadline: float) -> None:
    """One rank; it ends itself at `deadline` (faulthandler's watchdog thread, even inside a stuck collective)."""
    faulthandler.dump_traceback_later(max(1.0, deadline - time.time()), exit=True)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device(f"cuda:{rank}" if cfg.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_group(ParallelConfig(rank, world, f"file://{store}", cfg.backend), timeout_s=GROUP_TIMEOUT_S)
    try:
        with torch.no_grad():
            _run(rank, world, cfg, device, Path(out))
    except BaseException:  # leave at once: a peer may wait in a collective; the parent kills the others
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


# -- the parent ------------------------------------------------------------------------------------------


def _wait(procs, deadline: float) -> str:
    """'ok' when every rank exits 0; else kill the rest at once and say why."""
    while True:
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return "ok"
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed or time.time() > deadline:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(10)
            return f"rank {failed[0]} exited {codes[failed[0]]}" if failed else "deadline passed, ranks killed"
        time.sleep(0.2)


def _cell(values: list) -> str:
    return " / ".join("-" if v is None else f"{v:.3f}" for v in values)


def markdown(result: dict) -> str:
    devices = ", ".join(sorted(set(result.get("devices", ["?"]))))
    settings = result.get("settings", {})
    gating = settings.get("gating", "dynamic")
    if gating == "static":
        gating += f" f {settings.get('capacity_fraction')}"
    lines = [f"# Expert parallelism over W={result.get('world')} ({devices}; torch {result.get('torch')}, "
             f"NCCL {result.get('nccl')}, {result.get('dtype')}; {gating} gating; {result.get('exit')})", "",
             "Per forward of the layers; one GPU = the group's W*T tokens on one GPU without EP; collectives per "
             "rank from a separate instrumented pass.", "",
             "| T per rank | W*T | one GPU ms | EP ms | in collectives ms (per rank) | EP tok/s | one GPU tok/s "
             "| EP / one GPU | one GPU at T ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result.get("throughput", []):
        lines.append(f"| {r['tokens_per_rank']} | {r['group_tokens']} | {r['plain_ms']:.3f} | {r['ep_ms']:.3f} | "
                     f"{_cell(r['collective_ms_by_rank'])} | {r['ep_tokens_per_s']:,.0f} | "
                     f"{r['one_gpu_tokens_per_s']:,.0f} | {r['speedup']:.2f}x | {r['plain_rank_batch_ms']:.3f} |")
    skew = result.get("skew")
    if skew:
        lines += ["", f"Skewed routers (~Zipf), T={skew['tokens_per_rank']} per rank, planned from one batch, "
                  "measured on another:", "",
                  "| placement | S | token-slots per rank per forward (layer 0) | imbalance (predicted) | balancedness | EP ms "
                  "| in collectives ms | tok/s | vs round_robin | switch s | copied MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in skew["placements"]:
            predicted = f" ({p['predicted_imbalance']:.3f})" if "predicted_imbalance" in p else ""
            switch = f"{p['switch_s']:.3f} | {p['copied_bytes'] / 2**20:.1f}" if "switch_s" in p else "- | -"
            lines.append(f"| {p['planner']} | {p['slots_per_rank']} | "
                         f"{' / '.join(f'{v:.0f}' for v in p['rank_token_slots'][0])} | {p['imbalance']:.3f}"
                         f"{predicted} | {p['balancedness']:.3f} | {p['ep_ms']:.3f} | "
                         f"{_cell(p['collective_ms_by_rank'])} | {p['tokens_per_s']:,.0f} | "
                         f"{p.get('speedup_vs_round_robin', 1.0):.2f}x | {switch} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="ranks W (one GPU each)")
    parser.add_argument("--layers", type=int, default=1, help="MoE layers per forward")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--deadline-s", type=float, default=200.0, help="every rank is killed after this")
    parser.add_argument("--quick", action="store_true", help="tiny shape on the CPU with gloo (checks the script)")
    parser.add_argument("--gating", choices=("dynamic", "static"), default="dynamic")
    parser.add_argument("--capacity-fraction", type=float, default=0.25,
                        help="static gating: per-expert capacity = ceil(f * tokens per rank)")
    opts = parser.parse_args()
    cfg = Settings.for_mode(opts.quick, opts.layers, opts.gating, opts.capacity_fraction)
    if cfg.device == "cuda" and torch.cuda.device_count() < opts.world:
        parser.error(f"--world {opts.world} needs {opts.world} GPUs, found {torch.cuda.device_count()}")
    # NVLink multicast off in NCCL, PyTorch and NVSHMEM: the lent machines ask for it (their KINDS.md)
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cfg.stem}.json").unlink(missing_ok=True)
    deadline = time.time() + opts.deadline_s
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ep-multi-") as tmp:
        procs = [ctx.Process(target=_worker, args=(r, opts.world, cfg, str(out), f"{tmp}/store", deadline))
                 for r in range(opts.world)]
        for p in procs:
            p.start()
        status = _wait(procs, deadline)
    path = out / f"{cfg.stem}.json"
    result = json.loads(path.read_text()) if path.exists() else {"world": opts.world}
    result["exit"] = status
    path.write_text(json.dumps(result, indent=2))
    (out / f"{cfg.stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if status == "ok" and result.get("complete") else 1


if __name__ == "__main__":
    sys.exit(main())
