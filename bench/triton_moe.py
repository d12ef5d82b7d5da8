"""Mid-size MoE layer: the Triton fused MoE (triton_moe.py) vs the grouped-GEMM dynamic path vs the
measured-rate roofline, at T = 64 .. 4096 (issue 8).

Owns the fused kernel's microbenchmark: Mixtral-8x7B shape, bf16, the tile table's pick and a few other
tile configs, each kernel's device time from the profiler for the table's pick, and its agreement with
experts_dynamic. Timer, rates and roofline are bench/moe_layer.py's. Writes OUT/triton_moe.json and .md;
timings are never assertions. `--quick` runs tiny shapes (CPU: only the dynamic path) end to end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer  # shared with every bench
from moe_layer import (
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

from moe_runtime import triton_moe
from moe_runtime.experts import experts_dynamic
from moe_runtime.triton_moe import MoeTiles, experts_fused, tiles_for

# T tokens, E experts, K top-k, H hidden, F ffn

# Tile hypotheses beside the table's pick (MoeTiles: block_m, block_f, block_h, block_k, group_m, warps,
# stages): vLLM's H100 TP2 pick for M 128-256; half-width gate_up tiles (two fp32 accumulators of
# 128 x 64, not 128 x 128); twice the down programs (128 x 128 tiles: one wave of 128 is < 132 SMs).
CONFIGS = {
    "bm64 f64 h128 k128 w4": MoeTiles(64, 64, 128, 128, 8, 4, 4),
    "bm128 f64 h256 k64 w8": MoeTiles(128, 64, 256, 64, 16, 8, 4),
    "bm128 f128 h128 k64 w8": MoeTiles(128, 128, 128, 64, 16, 8, 4),
}
TOKENS = [64, 256, 512, 1024, 2048, 4096]
PROFILE_TOKENS = (512, 4096)
PROFILE_REPS = 10
DYNAMIC, TABLE = "experts_dynamic (grouped_mm)", "fused table"


def main() -> None:
    args = _parse_args()
    moe_layer.CELL_BUDGET_S = 0.4  # ~30 cells in ~90 s on an H100, compiling included
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = QUICK if args.quick else FULL
    layer = _make_layer(shape, dev)
    w13, w2 = layer["w13"], layer["w2"]
    rates = _measure_rates(dev, args.quick)
    fused = triton_moe.available(w13, w13, w2)  # only x's device and dtype are read: w13 stands in
    print(f"device {_device_name(dev)}: copy {rates['copy_GBps']:.3g} GB/s, GEMM {rates['gemm_TFLOPs']:.3g} "
          f"TFLOP/s; triton fused_moe available: {fused}", flush=True)  # fmt: skip
    paths = {DYNAMIC: lambda i: experts_dynamic(i["x"], w13, w2, i["weights"], i["ids"], i["counts"])}
    if fused:
        paths[TABLE] = lambda i: experts_fused(i["x"], w13, w2, i["weights"], i["ids"])
        for name, tiles in CONFIGS.items():
            paths[f"fused {name}"] = lambda i, c=tiles: experts_fused(
                i["x"], w13, w2, i["weights"], i["ids"], c
            )
    results, roofline, kernels, agreement = {}, {}, {}, {}
    for t in args.tokens:
        cells, roofline[t], kernels[t], agreement[t] = _bench_tokens(t, paths, layer, rates, args.quick)
        for name, cell in cells.items():
            results.setdefault(name, {})[t] = cell
    kernels = {t: k for t, k in kernels.items() if k}
    agreement = {t: a for t, a in agreement.items() if a}
    num_experts, top_k = shape["experts"], shape["top_k"]
    report = {
        "device": _device_name(dev),
        "versions": _versions(),
        "shape": {k: v for k, v in shape.items() if k != "tokens"} | {"dtype": "bfloat16"},
        "rates": rates,
        "configs": {n: c.__dict__ for n, c in CONFIGS.items()},
        "table_pick": {t: tiles_for(t * top_k, num_experts).__dict__ for t in args.tokens},
        "roofline": roofline,
        "results": results,
        "kernels_table_pick": kernels,
        "rel_diff_fused_vs_dynamic": agreement,
        "notes": "ms per layer call, median over reps (CUDA events, moe_layer._median_ms), fresh inputs cycled, "
        "routing not timed; roofline = max(bytes of touched experts / measured copy bandwidth, flops / measured "
        "bf16 GEMM rate) (moe_layer._roofline); kernels: profiler device time per call.",
    }
    _write(Path(args.out), report, args.tokens)


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few reps (CPU smoke test)")
    p.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=TOKENS)
    return p.parse_args()


def _bench_tokens(t: int, paths: dict, layer: dict, rates: dict, quick: bool):
    """(cells by path, roofline, kernel times, fused vs dynamic) at T=t; the last two empty without triton."""
    inputs = [_draw_inputs(layer, t) for _ in range(NUM_INPUTS)]
    roofline = _roofline(layer, inputs, rates)
    cells, kernels, agreement = {}, {}, {}
    for name, fn in paths.items():
        cell = guarded(lambda fn=fn: {"ms": _median_ms(fn, inputs, quick)})
        if "ms" in cell:
            cell["ratio_roofline"] = cell["ms"] / roofline["ms"]
        cells[name] = cell
    if TABLE in paths:
        agreement = guarded(lambda: {"rel": _rel_diff(paths[TABLE](inputs[0]), paths[DYNAMIC](inputs[0]))})
        if t in PROFILE_TOKENS:
            kernels = guarded(lambda: _kernel_times(paths[TABLE], inputs))
    print(f"T={t}: " + ", ".join(f"{n} {_fmt(c)}" for n, c in cells.items()), flush=True)
    _free_memory()
    return cells, roofline, kernels, agreement


def _kernel_times(fn, inputs: list[dict]) -> dict:
    """Device µs per call of each kernel the path launches (align's torch ops included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for r in range(PROFILE_REPS):
            fn(inputs[r % len(inputs)])
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total:
            times[event.key] = round(total / PROFILE_REPS, 1)
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _fmt(cell: dict) -> str:
    if "ms" not in cell:
        return cell["status"][:60]
    return f"{cell['ms']:.3g} ({cell['ratio_roofline']:.2f}x)"


def _write(out: Path, report: dict, tokens: list[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton_moe.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = _markdown(report, tokens)
    (out / "triton_moe.md").write_text(table)
    print(f"\nwrote {out / 'triton_moe.json'} and {out / 'triton_moe.md'}\n")
    print(table)


def _markdown(report: dict, tokens: list[int]) -> str:
    s, v, r = report["shape"], report["versions"], report["rates"]
    lines = [
        f"MoE layer H={s['hidden']} F={s['ffn']} E={s['experts']} top-{s['top_k']} bf16 on {report['device']} "
        f"(torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}; copy {r['copy_GBps']:.3g} GB/s, GEMM "
        f"{r['gemm_TFLOPs']:.3g} TFLOP/s). ms per layer (x measured-rate roofline).",
        "",
        "| path | " + " | ".join(f"T={t}" for t in tokens) + " |",
        "|---|" + "---|" * len(tokens),
        "| roofline | " + " | ".join(f"{report['roofline'][t]['ms']:.3g}" for t in tokens) + " |",
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
    picks = report["table_pick"]
    lines += ["", "Table pick (BM, BF, BH, BK, G, warps, stages): " + "; ".join(
        f"T={t} {tuple(picks[t].values())}" for t in tokens)]  # fmt: skip
    if report["rel_diff_fused_vs_dynamic"]:
        lines.append("Rel diff fused vs dynamic: " + "; ".join(
            f"T={t} {c.get('rel', c.get('status'))}" for t, c in report["rel_diff_fused_vs_dynamic"].items()))  # fmt: skip
    for t, kernels in report["kernels_table_pick"].items():
        parts = [f"{name[:48]} {us}" for name, us in kernels.items() if not isinstance(us, str)][:8]
        lines.append(f"- T={t} kernels µs/call: " + "; ".join(parts or [str(kernels.get("status"))]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with torch.inference_mode():
        main()
