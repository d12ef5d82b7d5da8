"""Serving overhead (issue 4's benchmark): streams over loopback gRPC against the engine driven in-process.

Owns the serving benchmark: N concurrent streams (1, 8, 32, 128) of a fixed-length prompt and max_tokens
(ignore_eos) on the 4-layer Mixtral-8x7B-shaped model of issue 8 (random bf16 weights), first through
moe_runtime.scheduler.Engine in this process, then through a RuntimeServer (moe_runtime.testing.
ServerThread) whose Generation stream a client in a child process drives with grpc.aio, so the client
never shares the server's interpreter lock. Reports tokens/s, time to first token and the server/engine
ratio; writes OUT/serve.json and OUT/serve.md; timings are results, never assertions. `--quick`: the
tiny preset on CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
sys.path.insert(0, str(RUNTIME))

FULL = {"model": "mixtral-8x7b", "layers": 4, "streams": [1, 8, 32, 128], "prompt": 64, "max_tokens": 64,
        "dtype": "bfloat16", "rounds": 5,
        "warm_s": 1.0, "window_s": 4.0}
QUICK = {"model": "tiny", "layers": 2, "streams": [1, 4, 8], "prompt": 16, "max_tokens": 16,
         "dtype": "float32", "rounds": 2,
        "warm_s": 0.3, "window_s": 1.0}
CHANNEL_STREAMS = 32  # streams per client channel (HTTP/2 connection)


def main() -> None:
    opts = _parse_args()
    if opts.client:
        asyncio.run(_client_main(opts))
        return
    setup = QUICK if opts.quick else FULL
    report = _bench(setup, opts.quick, opts.switch_interval_ms)
    _write(Path(opts.out), report)


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny preset on CPU (smoke test)")
    p.add_argument("--switch-interval-ms", type=float, default=0.5,
                   help="serving.switch_interval_ms, set for the engine run too (the server sets it itself)")
    p.add_argument("--client", help=argparse.SUPPRESS)  # ADDRESS: run as the gRPC client child
    p.add_argument("--spec", help=argparse.SUPPRESS)  # the child's JSON: prompts, max_tokens, rounds
    return p.parse_args()


# ---- the server side (this process) ------------------------------------------------------------------


def _bench(setup: dict, quick: bool, switch_interval_ms: float) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moe_layer import _device_name, _versions

    from moe_runtime.config import ServingConfig
    from moe_runtime.model import ModelArgs
    from moe_runtime.weights import init_random

    dev = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    margs = ModelArgs.from_name(setup["model"]).with_(num_layers=setup["layers"])
    t0 = time.perf_counter()
    model = init_random(margs, seed=0, device=dev, dtype=getattr(torch, setup["dtype"]))
    print(f"model ready on {_device_name(dev)} in {time.perf_counter() - t0:.1f} s", flush=True)
    serving = ServingConfig(
        host="127.0.0.1", grpc_port=0, metrics_port=0, admin_port=0, admin_bind_address="127.0.0.1",
        max_running_sequences=max(setup["streams"]), max_queue=4 * max(setup["streams"]),
        max_tokens_limit=setup["max_tokens"], max_seq_len=setup["prompt"] + setup["max_tokens"] + 8,
        switch_interval_ms=switch_interval_ms,
    )
    prompts = _prompts(max(setup["streams"]), setup["prompt"], margs.vocab_size)
    sys.setswitchinterval(switch_interval_ms / 1e3)  # the engine run under the server's setting
    engine = _bench_engine(model, serving, prompts, setup)
    server = _bench_server(model, serving, prompts, setup, dev)
    results = {}
    for n in setup["streams"]:
        e, s = engine[n], server[n]
        results[n] = {"engine": e, "server": s, "ratio_tokens_per_s": s["tokens_per_s"] / e["tokens_per_s"],
                      "ttft_ms_added": s["ttft_ms_median"] - e["ttft_ms_median"],
                      "sustained_ratio_tokens_per_s": s["sustained"]["tokens_per_s"] / e["sustained"]["tokens_per_s"]}
    return {
        "device": _device_name(dev),
        "versions": _versions() | {"grpc": __import__("grpc").__version__},
        "model": margs.to_dict() | {"dtype": setup["dtype"]},
        "setup": setup,
        "serving": {k: getattr(serving, k) for k in ("max_running_sequences", "max_batch_tokens", "max_seq_len")},
        "results": results,
        "switch_interval_ms": sys.getswitchinterval() * 1e3,
        "notes": "each level: one warm-up round, then `rounds` timed rounds; the round with the median tokens/s "
        "is reported. tokens/s = generated tokens / (last token - first submit); TTFT from submit (engine) or "
        "from the call (client) to the first token; cpu_share = process CPU seconds / wall seconds of the round "
        "(server side: this process, engine and gRPC threads together, over the client child's whole run; client: "
        "the child process). sustained: a closed loop per stream (the next request as soon as the last one ends) "
        "for warm_s, then tokens counted over window_s: the throughput at that concurrency without a burst's "
        "start and drain tail.",
    }


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def _bench_engine(model, serving, prompts: list[list[int]], setup: dict) -> dict:
    from moe_runtime.scheduler import Engine

    engine = Engine(model, serving)
    engine.start()
    engine.capture_graphs()  # as the server does while it warms up, and then it freezes the heap
    gc.collect()
    gc.freeze()
    try:
        out = {}
        for n in setup["streams"]:
            rounds = [_engine_round(engine, prompts[:n], setup["max_tokens"]) for _ in range(setup["rounds"] + 1)]
            out[n] = _median_round(rounds[1:])
            out[n]["sustained"] = _engine_sustained(engine, prompts[:n], setup)
            print(f"engine  {n:>4} streams: {_fmt(out[n])}; sustained {out[n]['sustained']['tokens_per_s']:.1f} "
                  "tok/s", flush=True)
        return out
    finally:
        engine.shutdown()


def _engine_round(engine, prompts: list[list[int]], max_tokens: int) -> dict:
    from moe_runtime.generate import SamplingParams
    from moe_runtime.scheduler import Request

    params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
    left, done = [len(prompts)], threading.Event()
    first: dict[int, float] = {}
    counts = [0] * len(prompts)
    ends: list[float] = []
    lock = threading.Lock()

    def sink(i: int, event) -> None:
        now = time.perf_counter()
        counts[i] += len(event.token_ids)
        if event.token_ids and i not in first:
            first[i] = now
        if event.finish_reason is not None or event.error is not None:
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    ends.append(now)
                    done.set()

    cpu0, t0 = time.process_time(), time.perf_counter()
    for i, p in enumerate(prompts):
        engine.submit(Request(p, params, lambda ev, i=i: sink(i, ev)))
    done.wait(timeout=600)
    wall = ends[0] - t0
    ttft = [1e3 * (first[i] - t0) for i in range(len(prompts))]
    return _round_stats(sum(counts), wall, ttft, (time.process_time() - cpu0) / wall)


def _engine_sustained(engine, prompts: list[list[int]], setup: dict) -> dict:
    """Closed loop: each stream submits its next request as soon as its last one ends; tokens counted in
    a window after a warm-up, so no burst start or drain tail is in the figure."""
    from moe_runtime.generate import SamplingParams
    from moe_runtime.scheduler import Request

    params = SamplingParams(max_new_tokens=setup["max_tokens"], ignore_eos=True)
    t0 = time.perf_counter()
    w0, w1 = t0 + setup["warm_s"], t0 + setup["warm_s"] + setup["window_s"]
    lock, done = threading.Lock(), threading.Event()
    state = {"tokens": 0, "active": len(prompts), "ttft": []}

    def start(i: int) -> None:
        submitted = time.perf_counter()
        if submitted >= w1:
            with lock:
                state["active"] -= 1
                if state["active"] == 0:
                    done.set()
            return
        first = [True]

        def sink(event) -> None:
            now = time.perf_counter()
            if event.token_ids:
                with lock:
                    if w0 <= now < w1:
                        state["tokens"] += len(event.token_ids)
                    if first[0] and w0 <= submitted < w1:
                        state["ttft"].append(1e3 * (now - submitted))
                first[0] = False
            if event.finish_reason is not None or event.error is not None:
                start(i)

        engine.submit(Request(prompts[i], params, sink))

    for i in range(len(prompts)):
        start(i)
    done.wait(timeout=600)
    return _sustained_stats(state["tokens"], setup["window_s"], state["ttft"])


def _sustained_stats(tokens: int, window: float, ttft_ms: list[float]) -> dict:
    return {"tokens": tokens, "window_s": window, "tokens_per_s": tokens / window,
            "ttft_ms_median": statistics.median(ttft_ms) if ttft_ms else None, "requests_started": len(ttft_ms)}


def _bench_server(model, serving, prompts: list[list[int]], setup: dict, dev) -> dict:
    from moe_runtime.config import RuntimeConfig
    from moe_runtime.testing import ServerThread

    config = RuntimeConfig(model=setup["model"], device=str(dev), dtype=setup["dtype"], serving=serving)
    out = {}
    with ServerThread(config, model=model) as st:
        for n in setup["streams"]:
            spec = {"prompts": prompts[:n], "max_tokens": setup["max_tokens"], "rounds": setup["rounds"] + 1,
                    "warm_s": setup["warm_s"], "window_s": setup["window_s"]}
            cpu0, wall0 = time.process_time(), time.perf_counter()
            rounds = _run_client(st.address, spec)
            share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
            sustained = rounds[-1].pop("sustained")
            out[n] = _median_round(rounds[1:]) | {"server_cpu_share": share, "sustained": sustained}
            print(f"server  {n:>4} streams: {_fmt(out[n])} (client), server cpu {out[n]['server_cpu_share']:.2f}",
                  flush=True)
    return out


def _run_client(address: str, spec: dict) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(RUNTIME), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, __file__, "--client", address, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"client failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _round_stats(tokens: int, wall: float, ttft_ms: list[float], cpu_share: float) -> dict:
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_ms_median": statistics.median(ttft_ms), "ttft_ms_p90": _p90(ttft_ms),
            "ttft_ms_max": max(ttft_ms), "cpu_share": cpu_share}


def _median_round(rounds: list[dict]) -> dict:
    ordered = sorted(rounds, key=lambda r: r["tokens_per_s"])
    return ordered[len(ordered) // 2] | {"tokens_per_s_rounds": [r["tokens_per_s"] for r in rounds]}


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


# ---- the client (child process): no torch, grpc.aio only -------------------------------------------------


async def _client_main(opts: argparse.Namespace) -> None:
    import grpc

    spec = json.loads(opts.spec)
    n = len(spec["prompts"])
    channels = [grpc.aio.insecure_channel(opts.client) for _ in range(max(1, -(-n // CHANNEL_STREAMS)))]
    try:
        for ch in channels:
            await ch.channel_ready()
        rounds = [await _client_round(channels, spec) for _ in range(spec["rounds"])]
        rounds[-1]["sustained"] = await _client_sustained(channels, spec)
    finally:
        for ch in channels:
            await ch.close()
    print(json.dumps(rounds))


async def _client_round(channels, spec: dict) -> dict:
    from moe_runtime.api.v1 import generation_pb2 as gen_pb
    from moe_runtime.api.v1 import generation_pb2_grpc as gen_grpc

    stubs = [gen_grpc.GenerationStub(ch) for ch in channels]

    async def stream(i: int, prompt: list[int]) -> tuple[float, int]:
        request = gen_pb.GenerateRequest(prompt_ids=gen_pb.TokenIds(ids=prompt), max_tokens=spec["max_tokens"],
                                         ignore_eos=True)
        first, count = None, 0
        async for msg in stubs[i % len(stubs)].Generate(request):
            if msg.token_ids and first is None:
                first = time.perf_counter()
            count += len(msg.token_ids)
        return first, count

    cpu0, t0 = time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(stream(i, p) for i, p in enumerate(spec["prompts"])))
    wall = time.perf_counter() - t0
    ttft = [1e3 * (first - t0) for first, _ in results]
    return _round_stats(sum(c for _, c in results), wall, ttft, (time.process_time() - cpu0) / wall)


async def _client_sustained(channels, spec: dict) -> dict:
    """The closed loop of _engine_sustained over gRPC: each stream calls again as soon as a call ends."""
    from moe_runtime.api.v1 import generation_pb2 as gen_pb
    from moe_runtime.api.v1 import generation_pb2_grpc as gen_grpc

    stubs = [gen_grpc.GenerationStub(ch) for ch in channels]
    t0 = time.perf_counter()
    w0, w1 = t0 + spec["warm_s"], t0 + spec["warm_s"] + spec["window_s"]
    state = {"tokens": 0, "ttft": []}

    async def stream(i: int, prompt: list[int]) -> None:
        request = gen_pb.GenerateRequest(prompt_ids=gen_pb.TokenIds(ids=prompt), max_tokens=spec["max_tokens"],
                                         ignore_eos=True)
        while (submitted := time.perf_counter()) < w1:
            first = True
            async for msg in stubs[i % len(stubs)].Generate(request):
                now = time.perf_counter()
                if msg.token_ids:
                    if w0 <= now < w1:
                        state["tokens"] += len(msg.token_ids)
                    if first and w0 <= submitted < w1:
                        state["ttft"].append(1e3 * (now - submitted))
                    first = False

    await asyncio.gather(*(stream(i, p) for i, p in enumerate(spec["prompts"])))
    return _sustained_stats(state["tokens"], spec["window_s"], state["ttft"])


# ---- output ------------------------------------------------------------------------------------------------


def _fmt(r: dict) -> str:
    return (f"{r['tokens_per_s']:8.1f} tok/s, TTFT median {r['ttft_ms_median']:.1f} ms (p90 {r['ttft_ms_p90']:.1f}), "
            f"cpu {r['cpu_share']:.2f}")


def _write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = _markdown(report)
    (out / "serve.md").write_text(table)
    print(f"\nwrote {out / 'serve.json'} and {out / 'serve.md'}\n")
    print(table)


def _markdown(report: dict) -> str:
    s, m = report["setup"], report["model"]
    lines = [
        f"Serving, {m['num_layers']}-layer Mixtral-8x7B shape ({m['dtype']}, random weights) on {report['device']}: "
        f"{s['prompt']}-token prompts, {s['max_tokens']} tokens each (ignore_eos), Generation stream over loopback "
        "gRPC (client in a child process) vs the Engine in-process.",
        "",
        "One burst per round: every stream starts at once, the round ends with the last token (median of the "
        "timed rounds). Sustained: each stream calls again as soon as a call ends; tokens counted in a "
        f"{s['window_s']:g} s window after {s['warm_s']:g} s.",
        "",
        "| streams | engine tok/s | server tok/s | server / engine | engine TTFT ms (p90) | server TTFT ms (p90) "
        "| server cpu | client cpu | sustained engine tok/s | sustained server tok/s | sustained server / engine |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in report["results"].items():
        e, v = r["engine"], r["server"]
        lines.append(
            f"| {n} | {e['tokens_per_s']:.1f} | {v['tokens_per_s']:.1f} | {r['ratio_tokens_per_s']:.2f} "
            f"| {e['ttft_ms_median']:.1f} ({e['ttft_ms_p90']:.1f}) | {v['ttft_ms_median']:.1f} ({v['ttft_ms_p90']:.1f}) "
            f"| {v['server_cpu_share']:.2f} | {v['cpu_share']:.2f} "
            f"| {e['sustained']['tokens_per_s']:.1f} | {v['sustained']['tokens_per_s']:.1f} "
            f"| {r['sustained_ratio_tokens_per_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
