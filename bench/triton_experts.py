"""Decode expert FFN: the Triton GEMV (triton_experts.py) vs the grouped-GEMM dynamic path vs the
weight-streaming bound, at T = 1, 2, 4, 8 (issue 8).

Owns the kernel's microbenchmark: Mixtral-8x7B shape, bf16, eager and CUDA-graph replay, a few tile
configs, and each kernel's device time from the profiler, so one GPU run says what bounds it. Timer, rates
and bound are bench/moe_layer.py's. Writes OUT/triton_experts.json and .md; timings are never assertions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import (  # shared with every bench
    FULL,
    NUM_INPUTS,
    QUICK,
    _device_name,
    _draw_inputs,
    _free_memory,
    _make_layer,
    _measure_rates,
    _median_ms,
    _roofline,
    _versions,
    guarded,
)

from moe_runtime import triton_experts
from moe_runtime.experts import experts_dynamic
from moe_runtime.triton_experts import GemvConfig, experts_gemv

# T tokens, E experts, K top-k, H hidden, F ffn

# Tile hypotheses for one GPU run (default: 40 KB a stage, one program per SM on an H100).
CONFIGS = {
    "default": GemvConfig(),
    "half tiles (2 programs/SM)": GemvConfig(block_h=128, block_f2=128),
    "w8 s5 (vLLM M=1)": GemvConfig(num_warps=8, num_stages=5),
    "f64 w8": GemvConfig(block_f=64, num_warps=8),
    "s3": GemvConfig(num_stages=3),
    "split 1024": GemvConfig(split_f=1024),
    "split 4096 h2 128": GemvConfig(split_f=4096, block_h2=128),
}
PROFILE_REPS = 20
DYNAMIC, GEMV = "experts_dynamic (grouped_mm)", "experts_gemv default"  # the two paths also timed as graphs


def main() -> None:
    args = _parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = QUICK if args.quick else FULL
    layer = _make_layer(shape, dev)
    w13, w2 = layer["w13"], layer["w2"]
    rates = _measure_rates(dev, args.quick)
    gemv = triton_experts.available(w13, w13, w2)  # only x's device and dtype are read: w13 stands in
    print(f"device {_device_name(dev)}: copy {rates['copy_GBps']:.3g} GB/s; triton gemv available: {gemv}")
    paths = {DYNAMIC: lambda i: experts_dynamic(i["x"], w13, w2, i["weights"], i["ids"], i["counts"])}
    if gemv:
        for name, config in CONFIGS.items():
            paths[f"experts_gemv {name}"] = lambda i, c=config: experts_gemv(
                i["x"], w13, w2, i["weights"], i["ids"], c
            )
    cells = [_bench_tokens(t, paths, layer, rates, args.quick) for t in args.tokens]
    results = {}
    for t, (timed, _, _, _) in zip(args.tokens, cells):
        for name, cell in timed.items():
            results.setdefault(name, {})[t] = cell
    report = {
        "device": _device_name(dev),
        "versions": _versions(),
        "shape": {k: v for k, v in shape.items() if k != "tokens"} | {"dtype": "bfloat16"},
        "rates": rates,
        "configs": {n: c.__dict__ for n, c in CONFIGS.items()},
        "bound": {t: c[1] for t, c in zip(args.tokens, cells)},
        "results": results,
        "kernels_default_config": {t: c[2] for t, c in zip(args.tokens, cells) if c[2]},
        "rel_diff_gemv_vs_dynamic": {t: c[3] for t, c in zip(args.tokens, cells) if c[3]},
        "notes": "ms per layer call, median over reps (CUDA events, moe_layer._median_ms), fresh inputs cycled; "
        "graph = the same call captured once per input and replayed; bound = bytes of the experts the routing "
        "touched / measured copy bandwidth (moe_layer._roofline); kernels: profiler device time per call.",
    }
    _write(Path(args.out), report, args.tokens)


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few reps (CPU smoke test)")
    p.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8])
    return p.parse_args()


def _bench_tokens(t: int, paths: dict, layer: dict, rates: dict, quick: bool):
    """(cells by path, bound, kernel times, gemv vs dynamic) at T=t; the last two empty without the gemv."""
    inputs = [_draw_inputs(layer, t) for _ in range(NUM_INPUTS)]
    bound = _roofline(layer, inputs, rates)
    timed, kernels, agreement = {}, {}, {}
    for name, fn in paths.items():
        timed[f"{name} eager"] = _with_ratio(
            guarded(lambda fn=fn: {"ms": _median_ms(fn, inputs, quick)}), bound
        )
        if name in (DYNAMIC, GEMV) and torch.cuda.is_available():
            timed[f"{name} graph"] = _with_ratio(guarded(lambda fn=fn: {"ms": _graph_ms(fn, inputs)}), bound)
    if GEMV in paths:
        agreement = guarded(lambda: {"rel": _rel_diff(paths[GEMV](inputs[0]), paths[DYNAMIC](inputs[0]))})
        kernels = guarded(lambda: _kernel_times(paths[GEMV], inputs, layer, bound))
    print(f"T={t}: " + ", ".join(f"{n} {_fmt(c)}" for n, c in timed.items()), flush=True)
    _free_memory()
    return timed, bound, kernels, agreement


def _graph_ms(fn, inputs: list[dict]) -> float:
    """Median ms of replaying fn captured once per input set (as a decode step runs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in inputs:
            fn(i)  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for i in inputs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(i)
        graphs.append({"graph": graph})
    return _median_ms(lambda g: g["graph"].replay(), graphs, quick=False)


def _kernel_times(fn, inputs: list[dict], layer: dict, bound: dict) -> dict:
    """Device µs per call of each kernel, and GB/s of weights streamed by the two Triton kernels."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for r in range(PROFILE_REPS):
            fn(inputs[r % len(inputs)])
        torch.cuda.synchronize()
    hidden, ffn = layer["hidden"], layer["ffn"]
    streamed = {"_gate_up_kernel": 2 * ffn * hidden * 2, "_down_kernel": hidden * ffn * 2}  # bf16 per expert
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total:
            cell = {"us_per_call": total / PROFILE_REPS}
            if event.key in streamed:
                nbytes = bound["distinct_experts"] * streamed[event.key]
                cell["weight_GBps"] = nbytes / (cell["us_per_call"] * 1e3)
            times[event.key] = cell
    return times


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _with_ratio(cell: dict, bound: dict) -> dict:
    if "ms" in cell:
        cell["ratio_bound"] = cell["ms"] / bound["ms"]
    return cell


def _fmt(cell: dict) -> str:
    if "ms" not in cell:
        return cell["status"][:60]
    return f"{cell['ms']:.3g} ({cell['ratio_bound']:.2f}x)"


def _write(out: Path, report: dict, tokens: list[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton_experts.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = _markdown(report, tokens)
    (out / "triton_experts.md").write_text(table)
    print(f"\nwrote {out / 'triton_experts.json'} and {out / 'triton_experts.md'}\n")
    print(table)


def _markdown(report: dict, tokens: list[int]) -> str:
    s, v = report["shape"], report["versions"]
    lines = [
        f"Decode expert FFN H={s['hidden']} F={s['ffn']} E={s['experts']} top-{s['top_k']} bf16 on "
        f"{report['device']} (torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}; copy "
        f"{report['rates']['copy_GBps']:.3g} GB/s). ms per layer (x weight-streaming bound).",
        "",
        "| path | " + " | ".join(f"T={t}" for t in tokens) + " |",
        "|---|" + "---|" * len(tokens),
        "| bound | " + " | ".join(f"{report['bound'][t]['ms']:.3g}" for t in tokens) + " |",
    ]
    lines += [
        f"| {name} | " + " | ".join(_fmt(c[t]) for t in tokens) + " |"
        for name, c in report["results"].items()
    ]
    best = {
        t: min(((c[t]["ms"], n) for n, c in report["results"].items() if "ms" in c[t]), default=None)
        for t in tokens
    }
    lines += ["", "Fastest: " + "; ".join(f"T={t} {b[1]}" for t, b in best.items() if b)]
    if report["kernels_default_config"]:
        lines += ["", "Default config, device µs per call (weight GB/s) from the profiler:", ""]
        for t, kernels in report["kernels_default_config"].items():
            parts = [
                f"{name[:40]} {k['us_per_call']:.1f}"
                + (f" ({k['weight_GBps']:.0f})" if "weight_GBps" in k else "")
                for name, k in kernels.items()
                if isinstance(k, dict)
            ]
            lines.append(f"- T={t}: " + "; ".join(parts or [str(kernels.get("status"))]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with torch.inference_mode():
        main()
