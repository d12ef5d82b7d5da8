"""One MoE layer of Mixtral-8x7B shape: our expert paths vs transformers' vs the measured roofline.

Owns the layer benchmark of issue 3 / issue 8: times every path with the same routing (routing itself is
not timed), measures copy bandwidth and bf16 GEMM rate in the same run for the roofline, and writes
OUT/moe_layer.json and OUT/moe_layer.md. Timings are results, never assertions. `--quick` runs tiny
shapes on whatever device there is (CPU included) to check the script end to end.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from moe_runtime import triton_experts, triton_moe
from moe_runtime.experts import (
    DECODE_MAX_SLOTS,
    experts_dynamic,
    experts_reference,
    experts_static,
    run_experts,
)
from moe_runtime.gating import route
from moe_runtime.triton_experts import GEMV_MAX_SLOTS, experts_gemv
from moe_runtime.triton_moe import experts_fused

# T tokens, E experts, K top-k, H hidden, F ffn; S = T*K token-slots.

FULL = {"hidden": 4096, "ffn": 14336, "experts": 8, "top_k": 2, "tokens": [1, 8, 64, 512, 4096, 16384]}
QUICK = {"hidden": 128, "ffn": 256, "experts": 8, "top_k": 2, "tokens": [1, 8, 64, 256]}
STATIC_FRACTIONS = (0.25, 0.5, 1.0)
HF_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
NUM_INPUTS = 3  # fresh inputs cycled through the reps, so no rep reuses the previous one's activations
CELL_BUDGET_S = 1.0  # target timed seconds per (path, T) cell; keeps the full run within ~4 minutes
TRITON_PATH = "ours triton experts_gemv"  # decode kernel: only T*K <= GEMV_MAX_SLOTS, only where triton runs
FUSED_PATH = "ours triton fused_moe"  # forced experts_fused: T*K > DECODE_MAX_SLOTS, where triton runs


def main() -> None:
    args = _parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = QUICK if args.quick else FULL
    tokens = args.tokens or shape["tokens"]
    layer = _make_layer(shape, dev)
    rates = _measure_rates(dev, args.quick)
    print(
        f"device {_device_name(dev)}: copy {rates['copy_GBps']:.3g} GB/s, bf16 GEMM {rates['gemm_TFLOPs']:.3g} TFLOP/s"
    )
    paths, hf_ran = _paths(layer)
    inputs = {t: [_draw_inputs(layer, t) for _ in range(NUM_INPUTS)] for t in tokens}
    accuracy = _check_accuracy(paths, layer, 16 if args.quick else 64)
    roofline = {t: _roofline(layer, inputs[t], rates) for t in tokens}
    results = {name: {} for name in paths}
    for t in tokens:
        for name, fn in paths.items():
            results[name][t] = _time_cell(name, fn, layer, inputs[t], args.quick)
            results[name][t]["ratio_roofline"] = _ratio(results[name][t].get("ms"), roofline[t]["ms"])
            print(f"T={t:>6} {name:<30} {_fmt(results[name][t])}", flush=True)
    _add_hf_ratios(results, tokens)
    report = {
        "device": _device_name(dev),
        "versions": _versions(),
        "shape": {k: v for k, v in shape.items() if k != "tokens"} | {"dtype": "bfloat16"},
        "rates": rates,
        "transformers_implementations_ran": hf_ran,
        "accuracy_rel_err_vs_fp32_reference": accuracy,
        "roofline": roofline,
        "results": results,
        "notes": "ms per layer call, median over reps (CUDA events); routing not timed; ratio_roofline = ms / "
        "max(bytes / copy bandwidth, flops / GEMM rate); ratio_hf_best = ms / best transformers experts ms; "
        "'plain torch._grouped_mm' = the two grouped GEMMs + SiLU on pre-sorted rows only.",
    }
    _write(Path(args.out), report, tokens)


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few reps (CPU smoke test)")
    p.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], help="comma-separated T values")
    return p.parse_args()


def _make_layer(shape: dict, dev: torch.device) -> dict:
    """Random bf16 weights (nn.Linear layout) and a random router, so routing is near uniform."""
    h, f, e = shape["hidden"], shape["ffn"], shape["experts"]
    bf16 = torch.bfloat16
    w13 = (torch.randn(e, 2 * f, h, device=dev) * h**-0.5).to(bf16)  # [E, 2F, H]
    w2 = (torch.randn(e, h, f, device=dev) * f**-0.5).to(bf16)  # [E, H, F]
    router = torch.randn(e, h, device=dev) * h**-0.5  # [E, H]
    return {"w13": w13, "w2": w2, "router": router, "top_k": shape["top_k"], "hidden": h, "ffn": f}


def _draw_inputs(layer: dict, num_tokens: int) -> dict:
    x = torch.randn(num_tokens, layer["hidden"], device=layer["w13"].device).to(torch.bfloat16)  # [T, H]
    routing = route(x.float() @ layer["router"].T, layer["top_k"])
    return {"x": x, "weights": routing.topk_weights, "ids": routing.topk_ids, "counts": routing.expert_counts}


def _paths(layer: dict) -> tuple[dict, list[str]]:
    """name -> fn(inputs) returning (out [T, H], dropped token-slots or None)."""
    w13, w2 = layer["w13"], layer["w2"]
    paths = {
        "ours dynamic (run_experts)": lambda i: run_experts(
            i["x"], w13, w2, i["weights"], i["ids"], expert_counts=i["counts"]
        ),
        "ours experts_dynamic (forced)": lambda i: (
            experts_dynamic(i["x"], w13, w2, i["weights"], i["ids"], i["counts"]),
            None,
        ),
    }
    if triton_experts.available(w13, w13, w2):  # only x's device and dtype are read: w13 stands in
        paths[TRITON_PATH] = lambda i: (experts_gemv(i["x"], w13, w2, i["weights"], i["ids"]), None)
    if triton_moe.available(w13, w13, w2):
        paths[FUSED_PATH] = lambda i: (experts_fused(i["x"], w13, w2, i["weights"], i["ids"]), None)
    for f in STATIC_FRACTIONS:
        paths[f"ours static f={f}"] = lambda i, f=f: experts_static(
            i["x"], w13, w2, i["weights"], i["ids"], f
        )
    hf_paths = _hf_paths(layer)
    paths |= hf_paths
    if hasattr(torch, "_grouped_mm"):
        paths["plain torch._grouped_mm"] = _plain_grouped_mm(layer)
    return paths, sorted(hf_paths)


def _hf_paths(layer: dict) -> dict:
    """transformers' MixtralExperts under each experts implementation it registers; missing ones skipped."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError as exc:
        print(f"transformers Mixtral experts unavailable: {exc}")
        return {}
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        registered = {"eager"} | {n for n in HF_IMPLEMENTATIONS if n in ALL_EXPERTS_FUNCTIONS}
    except ImportError:
        registered = {"eager"}
    w13, w2 = layer["w13"], layer["w2"]
    paths = {}
    for impl in HF_IMPLEMENTATIONS:
        if impl not in registered:
            print(f"transformers experts implementation {impl!r} not registered in this version; skipped")
            continue
        config = MixtralConfig(
            hidden_size=layer["hidden"],
            intermediate_size=layer["ffn"],
            num_local_experts=w13.shape[0],
            num_experts_per_tok=layer["top_k"],
        )
        config._experts_implementation = impl  # read by the @use_experts_implementation forward per call
        with torch.device("meta"):
            module = MixtralExperts(config)
        # Share our weights: HF's gate_up_proj is cat(gate, up) [E, 2F, H] and down_proj [E, H, F], as ours.
        module.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
        module.down_proj = torch.nn.Parameter(w2, requires_grad=False)
        paths[f"transformers {impl}"] = lambda i, m=module: (m(i["x"], i["ids"], i["weights"]), None)
    return paths


def _plain_grouped_mm(layer: dict):
    """Only the two grouped GEMMs and SiLU-mul on rows already sorted by expert: the kernels' own cost."""
    w13t, w2t = layer["w13"].transpose(-2, -1), layer["w2"].transpose(-2, -1)  # views, no copy
    ffn = layer["ffn"]

    def run(i):
        if "sorted" not in i:  # sort once per input set, outside the timed region
            order = torch.argsort(i["ids"].reshape(-1), stable=True)
            i["sorted"] = i["x"][order // layer["top_k"]]  # [S, H]
            i["offs"] = torch.cumsum(i["counts"], 0, dtype=torch.int32)  # [E]
        h = torch._grouped_mm(i["sorted"], w13t, offs=i["offs"])  # [S, 2F]
        a = torch.nn.functional.silu(h[:, :ffn]) * h[:, ffn:]  # [S, F]
        return torch._grouped_mm(a, w2t, offs=i["offs"]), None  # [S, H]

    return run


def _check_accuracy(paths: dict, layer: dict, num_tokens: int) -> dict:
    """Relative error (of the norm) of each path against experts_reference in float32, at a small T."""
    i = _draw_inputs(layer, num_tokens)
    want = experts_reference(
        i["x"].float(), layer["w13"].float(), layer["w2"].float(), i["weights"], i["ids"]
    )
    errors = {}
    for name, fn in paths.items():
        try:
            inputs = i
            if name == TRITON_PATH:  # a decode kernel: the first GEMV_MAX_SLOTS // K tokens
                inputs = {k: i[k][: GEMV_MAX_SLOTS // layer["top_k"]] for k in ("x", "weights", "ids")}
            out, dropped = fn(inputs)
            if name == "plain torch._grouped_mm":
                continue  # rows are in expert order, not token order: nothing to compare
            rows = want[: out.shape[0]]
            errors[name] = ((out.float() - rows).norm() / rows.norm()).item()
            why = (
                f" ({int(dropped)} token-slots dropped by capacity)"
                if dropped is not None and int(dropped)
                else ""
            )
            print(f"accuracy T={out.shape[0]} {name:<30} rel err of norm {errors[name]:.2e}{why}")
        except Exception as exc:  # a broken implementation is recorded, the bench goes on
            errors[name] = f"error: {type(exc).__name__}: {exc}"[:300]
            print(f"accuracy {name}: {errors[name]}")
    _free_memory()
    return errors


def _roofline(layer: dict, inputs: list[dict], rates: dict) -> dict:
    """Bytes of the experts the actual routing touches (+ activations) vs FLOPs, at the measured rates."""
    w13, w2 = layer["w13"], layer["w2"]
    num_tokens, top_k = inputs[0]["ids"].shape
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    touched = statistics.mean(int((i["counts"] > 0).sum()) for i in inputs)
    activation_bytes = 2 * num_tokens * layer["hidden"] * 2  # read x, write out, bf16
    nbytes = touched * expert_bytes + activation_bytes
    flops = 2 * num_tokens * top_k * 3 * layer["hidden"] * layer["ffn"]
    ms = 1e3 * max(nbytes / (rates["copy_GBps"] * 1e9), flops / (rates["gemm_TFLOPs"] * 1e12))
    return {"distinct_experts": touched, "bytes": nbytes, "flops": flops, "ms": ms}


def _time_cell(name: str, fn, layer: dict, inputs: list[dict], quick: bool) -> dict:
    """Median ms of fn over fresh inputs, dropped fraction and activation peak; OOM recorded, not raised."""
    num_slots = inputs[0]["ids"].numel()
    if name == "transformers batched_mm" and not _batched_mm_fits(layer, num_slots):
        return {"status": "skipped: copies one expert per token-slot, would not fit in memory"}
    if name == TRITON_PATH and num_slots > GEMV_MAX_SLOTS:
        return {"status": f"skipped: a decode kernel, T*K > {GEMV_MAX_SLOTS}"}
    if name == FUSED_PATH and num_slots <= DECODE_MAX_SLOTS:
        return {"status": f"skipped: the decode path's range, T*K <= {DECODE_MAX_SLOTS}"}
    return guarded(lambda: _measure_cell(fn, inputs, num_slots, quick))


def _measure_cell(fn, inputs: list[dict], num_slots: int, quick: bool) -> dict:
    _, dropped = fn(inputs[0])  # warm-up and the per-call numbers
    cell = {"status": "ok", "peak_activation_bytes": _peak_activation_bytes(fn, inputs[0])}
    if dropped is not None:
        cell["dropped_fraction"] = int(dropped) / num_slots
    cell["ms"] = _median_ms(fn, inputs, quick)
    return cell


def guarded(fn) -> dict:
    """fn()'s result, or a status cell when it runs out of memory or fails: one failing configuration
    must not end a benchmark run (bench/decode.py uses it too)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        return {"status": "oom"}
    except Exception as exc:
        return {"status": f"error: {type(exc).__name__}: {exc}"[:300]}
    finally:
        _free_memory()


def _batched_mm_fits(layer: dict, num_slots: int) -> bool:
    if not torch.cuda.is_available():
        return True
    per_slot = (layer["w13"][0].numel() + layer["w2"][0].numel()) * 2
    return num_slots * per_slot < 0.6 * torch.cuda.mem_get_info()[0]


def _peak_activation_bytes(fn, inputs: dict) -> int | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _median_ms(fn, inputs: list[dict], quick: bool) -> float:
    """Warm up, estimate one call, then time enough reps for ~CELL_BUDGET_S; median of per-rep times."""
    for i in inputs:
        fn(i)
    estimate = max(_elapsed_ms(fn, inputs, [0]), 1e-3)
    budget_ms = 1e3 * CELL_BUDGET_S * (0.2 if quick else 1.0)
    reps = int(min(100, max(5, budget_ms / estimate)))
    picks = [r % len(inputs) for r in range(reps)]
    if not torch.cuda.is_available():
        return statistics.median(_elapsed_ms(fn, inputs, [p]) for p in picks)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in picks]
    for (start, end), p in zip(events, picks):
        start.record()
        fn(inputs[p])
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _elapsed_ms(fn, inputs: list[dict], picks: list[int]) -> float:
    _sync()
    t0 = time.perf_counter()
    for p in picks:
        fn(inputs[p])
    _sync()
    return 1e3 * (time.perf_counter() - t0) / len(picks)


def _measure_rates(dev: torch.device, quick: bool) -> dict:
    """Device copy bandwidth (bytes read + written) and bf16 GEMM throughput, measured now."""
    rates = {"copy_GBps": _copy_GBps(dev, (64 if quick else 2048) * 2**20, quick)}
    rates["gemm_TFLOPs"] = _gemm_TFLOPs(dev, 1024 if quick else 8192, quick)
    _free_memory()
    return rates


def _copy_GBps(dev: torch.device, nbytes: int, quick: bool) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_ms(lambda _: dst.copy_(src), [{}], quick) / 1e6


def _gemm_TFLOPs(dev: torch.device, n: int, quick: bool) -> float:
    a = torch.randn(n, n, device=dev).to(torch.bfloat16)
    b = torch.randn(n, n, device=dev).to(torch.bfloat16)
    return 2 * n**3 / _median_ms(lambda _: a @ b, [{}], quick) / 1e9


def _add_hf_ratios(results: dict, tokens: list[int]) -> None:
    for t in tokens:
        hf = [r[t]["ms"] for name, r in results.items() if name.startswith("transformers") and "ms" in r[t]]
        best = min(hf) if hf else None
        for r in results.values():
            r[t]["ratio_hf_best"] = _ratio(r[t].get("ms"), best)


def _write(out: Path, report: dict, tokens: list[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_layer.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = _markdown(report, tokens)
    (out / "moe_layer.md").write_text(table)
    print(f"\nwrote {out / 'moe_layer.json'} and {out / 'moe_layer.md'}\n")
    print(table)


def _markdown(report: dict, tokens: list[int]) -> str:
    s = report["shape"]
    lines = [
        f"MoE layer H={s['hidden']} F={s['ffn']} E={s['experts']} top-{s['top_k']} bf16 on {report['device']} "
        f"(copy {report['rates']['copy_GBps']:.3g} GB/s, GEMM {report['rates']['gemm_TFLOPs']:.3g} TFLOP/s). "
        "ms per layer (x measured-rate roofline).",
        "",
        "| path | " + " | ".join(f"T={t}" for t in tokens) + " |",
        "|---|" + "---|" * len(tokens),
        "| roofline | " + " | ".join(f"{report['roofline'][t]['ms']:.3g}" for t in tokens) + " |",
    ]
    for name, cells in report["results"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(cells[t]) for t in tokens) + " |")
    return "\n".join(lines) + "\n"


def _fmt(cell: dict) -> str:
    if "ms" not in cell:
        return cell["status"].split(":")[0]
    text = f"{cell['ms']:.3g} ({cell['ratio_roofline']:.2f}x)"
    if cell.get("dropped_fraction"):
        text += f" drop {cell['dropped_fraction']:.0%}"
    return text


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"{torch.cuda.get_device_name(dev)} (sm{major}{minor})"
    return "cpu"


def _versions() -> dict:
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    for mod in ("transformers", "triton"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    return versions


if __name__ == "__main__":
    with torch.inference_mode():
        main()
