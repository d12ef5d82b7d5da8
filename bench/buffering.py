"""Expert buffering (issue 5): decode throughput and GPU expert memory against slots per layer and policy.

Mixtral-8x7B-shaped layers (bf16, 4 by default, random weights) decode at batch 1 and 8 on (a) the uniform
routing of the random routers, (b) the synthetic skewed trace (labelled synthetic) and (c) the demo model's
real held-out routing, (b) and (c) forced at full width; pinned H2D bandwidth is measured in the same run;
cache-sim gives every policy's miss rate and Belady's; last, a model whose experts exceed the GPU memory
generates. Writes OUT/buffering.{json,md,png}; timings are results, never assertions. `--quick`: tiny, CPU.
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
from moe_runtime.cache_policy import ONLINE_POLICIES
from moe_runtime.cache_sim import prefetch_recall, simulate
from moe_runtime.config import ExpertBufferingConfig
from moe_runtime.expert_cache import enable_expert_buffering
from moe_runtime.generate import decode_step, prefill
from moe_runtime.model import ModelArgs, Transformer
from moe_runtime.tokenizer import load_tokenizer
from moe_runtime.trace_recorder import TraceRecorder
from moe_runtime.traces import load_trace, synthetic_skewed_trace
from moe_runtime.weights import init_random, load_model

# B batch, L layers, E experts, K top-k; a step decodes one token for each of B sequences.

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "tiny-stdlib-moe"
FULL = {"layers": 4, "steps": {1: 32, 8: 12}, "warmup": {1: 8, 8: 4}, "sim_tokens": 4096, "record_tokens": 480,
        "demo_tokens": 4096, "live_budget_s": 150.0, "over_capacity_tokens": 12}
QUICK = {"layers": 2, "steps": {1: 6, 8: 3}, "warmup": {1: 2, 8: 1}, "sim_tokens": 256, "record_tokens": 64,
         "demo_tokens": 512, "live_budget_s": 60.0, "over_capacity_tokens": 0}
BATCHES = (1, 8)


def main() -> None:
    opts = _parse_args()
    cfg = QUICK if opts.quick else FULL
    dev = torch.device("cpu") if opts.quick or not torch.cuda.is_available() else torch.device("cuda", 0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    args = (ModelArgs.from_name("tiny") if opts.quick else ModelArgs.from_name("mixtral-8x7b")).with_(
        num_layers=cfg["layers"], max_seq_len=512)
    t0 = time.monotonic()
    report = {"device": _device_name(dev), "versions": {"torch": torch.__version__}, "dtype": str(dtype),
              "model": {k: getattr(args, k) for k in ("hidden_size", "intermediate_size", "num_layers",
                                                        "num_experts", "top_k", "vocab_size")},
              "expert_bytes": args.expert_bytes(dtype)}
    report["pinned_h2d_GBps"] = _h2d_bandwidth(dev, 256 << 20 if opts.quick else 1 << 30)
    print(f"{report['device']}: pinned H2D {_f(report['pinned_h2d_GBps'])} GB/s", flush=True)
    traces = _traces(args, cfg, dev)
    model = init_random(args, seed=0, device=dev, dtype=dtype)
    model.setup_cache(max(BATCHES), args.max_seq_len)
    report["resident"] = _resident_baselines(model, traces, cfg)
    buffering = enable_expert_buffering(model, ExpertBufferingConfig(enabled=True, slots_per_layer=args.num_experts))
    traces["uniform"].update(_record_uniform(model, cfg))
    report["sim"] = _simulate(traces, args)
    report["live"] = _live_sweep(model, buffering, traces, cfg, report)
    report["traces"] = {name: {k: v for k, v in t.items() if k not in ("trace", "predictions")}
                        for name, t in traces.items()}
    del model, buffering
    _free_memory()
    try:  # the sweeps above are the main result: a failure here must not lose them
        report["over_capacity"] = (_over_capacity(dev, cfg, opts.over_capacity_layers)
                                   if cfg["over_capacity_tokens"] and opts.over_capacity_layers
                                   else {"skipped": "quick"})
    except (RuntimeError, ValueError) as exc:
        report["over_capacity"] = {"error": repr(exc)}
    report["targets"] = _targets(report, args)
    report["seconds"] = round(time.monotonic() - t0, 1)
    _write(Path(opts.out), report)


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny preset on CPU, few steps (smoke test)")
    p.add_argument("--over-capacity-layers", type=int, default=16,
                   help="Mixtral-8x7B layers of the over-capacity run, at most what 60%% of free host memory "
                        "pins (32 = the whole model, ~84 GiB pinned); 0 skips it")
    return p.parse_args()


def _h2d_bandwidth(dev: torch.device, nbytes: int) -> float | None:
    """Pinned host -> device copy rate (GB/s), median of 5 event-timed copies; None on CPU."""
    if dev.type != "cuda":
        return None
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst.copy_(src, non_blocking=True)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times) / 1e9


def _traces(args: ModelArgs, cfg: dict, dev: torch.device) -> dict:
    """name -> {trace, predictions, label}; uniform's trace is recorded later from the model itself."""
    e, k = args.num_experts, args.top_k
    traces = {
        "uniform": {"trace": None, "predictions": None,
                    "label": "uniform: the random routers' own routing (prefetch: their own predictor)"},
        "synthetic": {"trace": synthetic_skewed_trace(cfg["sim_tokens"], args.num_layers, e, k, seed=0),
                      "predictions": None,
                      "label": "synthetic skewed trace (Zipf 1.0, reuse 0.5), forced; no predictor, so no prefetch"},
    }
    if DEMO.is_dir():
        try:
            traces["real"] = _demo_trace(cfg, dev, e, k)
        except ImportError as exc:  # no tokenizers here: the committed trace of the same text, no predictions
            traces["real"] = {"trace": load_trace(DEMO / "traces" / "heldout.npz"), "predictions": None,
                              "label": f"real: {DEMO.name}'s committed held-out trace, forced; no prefetch ({exc})"}
    return traces


def _demo_trace(cfg: dict, dev: torch.device, num_experts: int, top_k: int) -> dict:
    """The trained demo model's routing and prefetch predictions on its held-out text (teacher-forced
    prefill in 512-token windows), recorded by our runtime; replayed at full width by forced routing."""
    model = load_model(str(DEMO), device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if (model.args.num_experts, model.args.top_k) != (num_experts, top_k):
        return {"trace": None, "predictions": None, "label": "demo model shape differs: skipped"}
    enable_expert_buffering(model, ExpertBufferingConfig(enabled=True, slots_per_layer=num_experts))
    tokenizer = load_tokenizer(DEMO, model.args.vocab_size)
    ids = tokenizer.encode((DEMO / "heldout.txt").read_text(encoding="utf-8"))[: cfg["demo_tokens"]]
    window = min(512, model.args.max_seq_len)
    model.setup_cache(1, window)
    recorder = TraceRecorder(model)
    with torch.inference_mode():
        for start in range(0, len(ids), window):
            prefill(model, ids[start:start + window], 0)
    trace, predictions = recorder.trace(), recorder.prefetch_trace()
    return {"trace": trace, "predictions": predictions, "prefetch_recall": prefetch_recall(
        predictions.topk_ids, trace.topk_ids), "label": f"real: {DEMO.name} on held-out text ({trace.num_tokens} "
            "tokens, our runtime), forced, with its own recorded prefetch predictions"}


def _force(model: Transformer, entry: dict) -> None:
    """Route by the entry's trace and prefetch by its predictions, both from their first token."""
    model.force_routing(entry["trace"])
    if model.expert_buffering is not None:
        model.expert_buffering.force_predictions(entry["predictions"])


def _decode(model: Transformer, batch: int, steps: int, warmup: int, graphs: bool = False) -> dict:
    """Decode `steps` timed steps of `batch` one-token prompts after `warmup` steps; seconds per step and
    the cache counters of the timed steps."""
    with torch.inference_mode():
        logits = torch.stack([prefill(model, [1 + row], row) for row in range(batch)])
    tokens, rows = logits.argmax(-1), list(range(batch))
    for step in range(warmup + steps):
        if step == warmup:
            before = model.expert_cache_stats()
            _sync(model)
            start = time.perf_counter()
        tokens = decode_step(model, tokens, [1 + step] * batch, rows, cuda_graphs=graphs).argmax(-1)
    _sync(model)
    out = {"step_s": (time.perf_counter() - start) / steps}
    out["tokens_per_s"] = batch / out["step_s"]
    if before is not None:
        out |= _counters(model.expert_cache_stats(), before, steps)
    return out


def _counters(after, before, steps: int) -> dict:
    """Cache counters of the timed window, per step where it says so."""
    hits, misses = after.total_hits - before.total_hits, after.total_misses - before.total_misses
    copied = after.copied_bytes - before.copied_bytes
    copy_s, stall_s = after.copy_seconds - before.copy_seconds, after.stall_seconds - before.stall_seconds
    return {"miss_rate": misses / max(hits + misses, 1), "misses_per_step": misses / steps,
            "copied_bytes_per_step": copied / steps, "copy_s_per_step": copy_s / steps,
            "stall_s_per_step": stall_s / steps, "achieved_h2d_GBps": copied / copy_s / 1e9 if copy_s else None,
            "prefetch_recall": after.prefetch_recall}


def _resident_baselines(model: Transformer, traces: dict, cfg: dict) -> dict:
    """All experts resident (buffering off): eager and CUDA-graph decode per trace and batch."""
    out = {}
    for name, entry in traces.items():
        if name != "uniform" and entry["trace"] is None:
            continue
        for batch in BATCHES:
            _force(model, entry)
            row = {"eager": _decode(model, batch, cfg["steps"][batch], cfg["warmup"][batch])}
            if model.output.weight.is_cuda:
                _force(model, entry)
                row["graphs"] = _decode(model, batch, cfg["steps"][batch], cfg["warmup"][batch], graphs=True)
            out[f"{name}/b{batch}"] = row
            print(f"resident {name} b{batch}: {row['eager']['tokens_per_s']:.1f} tok/s eager", flush=True)
    model.force_routing(None)
    return out


def _record_uniform(model: Transformer, cfg: dict) -> dict:
    """The random routers' own routing and predictions at batch 1, for cache-sim (all experts resident)."""
    model.expert_buffering.configure(model.args.num_experts, "lru", prefetch=True)
    recorder = TraceRecorder(model)
    _decode(model, 1, cfg["record_tokens"], 0)
    recorder.detach()
    trace, predictions = recorder.trace(), recorder.prefetch_trace()
    return {"trace": trace, "predictions": predictions,
            "prefetch_recall": prefetch_recall(predictions.topk_ids, trace.topk_ids)}


def _simulate(traces: dict, args: ModelArgs) -> list[dict]:
    """cache-sim over every trace: online policies (with prefetch where a predictor exists) and Belady."""
    rows = []
    for name, entry in traces.items():
        if entry["trace"] is None:
            continue
        predicted = None if entry["predictions"] is None else entry["predictions"].topk_ids
        for batch in BATCHES:
            for slots in range(args.top_k, args.num_experts + 1):
                for policy in (*ONLINE_POLICIES, "belady"):
                    for prefetch in (None, predicted) if policy != "belady" and predicted is not None else (None,):
                        r = simulate(entry["trace"], slots, policy, batch, prefetch)
                        rows.append({"trace": name, "batch": batch, "slots": slots, "policy": r.label,
                                     "miss_rate": r.miss_rate, "worst_layer_miss_rate": r.worst_miss_rate,
                                     "loads_per_access": int(r.loads.sum()) / max(int(r.accesses.sum()), 1)})
    return rows


def _best_policy(sim: list[dict], trace: str, batch: int, slots: int) -> str:
    """The online policy (prefetch or not) with the lowest simulated miss rate at this point."""
    rows = [r for r in sim if (r["trace"], r["batch"], r["slots"]) == (trace, batch, slots)
            and r["policy"] != "belady"]
    return min(rows, key=lambda r: r["miss_rate"])["policy"].split("+")[0]


def _live_plan(traces: dict, sim: list[dict], args: ModelArgs) -> list[tuple]:
    """(trace, batch, slots, policy, prefetch) runs in tiers, so a time budget cuts the least telling:
    the best simulated policy at half the experts for every trace and batch, then the paper's lifo, then
    the other policies at batch 1, then the best policy without prefetch (what prefetch buys)."""
    tiers: list[list[tuple]] = [[], [], [], []]
    every = range(args.top_k, args.num_experts + 1)
    for name, entry in traces.items():
        if entry["trace"] is None:
            continue
        prefetch = name == "uniform" or entry["predictions"] is not None
        for batch in BATCHES:
            best = _best_policy(sim, name, batch, args.num_experts // 2)
            tiers[0] += [(name, batch, s, best, prefetch) for s in every]
            if best != "lifo":
                tiers[1] += [(name, batch, s, "lifo", prefetch) for s in every]
            if batch == 1:
                tiers[2] += [(name, batch, s, p, prefetch) for p in ONLINE_POLICIES if p not in (best, "lifo")
                             for s in every]
            if prefetch:
                tiers[3] += [(name, batch, s, best, False) for s in every[:-1]]
    return [run for tier in tiers for run in tier]


def _live_sweep(model: Transformer, buffering, traces: dict, cfg: dict, report: dict) -> list[dict]:
    """Buffered decode for every planned run until the time budget is spent (the rest is listed skipped)."""
    rows, deadline = [], time.monotonic() + cfg["live_budget_s"]
    for name, batch, slots, policy, prefetch in _live_plan(traces, report["sim"], model.args):
        row = {"trace": name, "batch": batch, "slots": slots, "policy": policy, "prefetch": prefetch,
               "expert_GiB": model.args.num_layers * slots * report["expert_bytes"] / 2**30}
        if time.monotonic() > deadline:
            rows.append(row | {"skipped": "time budget"})
            continue
        buffering.configure(slots, policy, prefetch)
        _force(model, traces[name] if name != "uniform" else {"trace": None, "predictions": None})
        row |= _decode(model, batch, cfg["steps"][batch], cfg["warmup"][batch])
        row |= _bound(row, report, name, batch)
        rows.append(row)
        print(f"{name} b{batch} slots={slots} {policy}{'+pf' if prefetch else ''}: {row['tokens_per_s']:.1f} tok/s, "
              f"miss {row['miss_rate']:.1%}, bound x{row['vs_bound'] or 0:.2f}", flush=True)
    model.force_routing(None)
    return rows


def _bound(row: dict, report: dict, trace: str, batch: int) -> dict:
    """Decode time against compute (all-resident eager) + copied bytes / pinned bandwidth; H2D efficiency."""
    resident = report["resident"][f"{trace}/b{batch}"]["eager"]
    bw = report["pinned_h2d_GBps"]
    out = {"vs_resident": row["tokens_per_s"] / resident["tokens_per_s"], "vs_bound": None, "h2d_of_pinned": None}
    if bw:
        bound = resident["step_s"] + row["copied_bytes_per_step"] / (bw * 1e9)
        out["vs_bound"] = row["step_s"] / bound
        if row["achieved_h2d_GBps"]:
            out["h2d_of_pinned"] = row["achieved_h2d_GBps"] / bw
    return out


def _over_capacity(dev: torch.device, cfg: dict, max_layers: int) -> dict:
    """Mixtral-8x7B-shaped experts beyond what this process may hold on the GPU, decoded with buffering.

    `max_layers` layers, fewer if ~60% of the free host memory cannot pin them; where their experts would
    still fit the GPU, the process's GPU memory is capped (set_per_process_memory_fraction) to 3/4 of them.
    """
    full = ModelArgs.from_name("mixtral-8x7b")
    layer_bytes = full.num_experts * full.expert_bytes(torch.bfloat16)
    layers = int(min(max_layers, full.num_layers, 0.6 * _host_available_bytes() // layer_bytes))
    total_gpu = torch.cuda.get_device_properties(dev).total_memory
    cap = min(total_gpu, int(0.75 * layers * layer_bytes))
    torch.cuda.set_per_process_memory_fraction(cap / total_gpu, dev)
    torch.cuda.reset_peak_memory_stats(dev)
    args = full.with_(num_layers=layers, max_seq_len=512)
    slots = max(args.top_k, int(0.5 * cap // (layers * full.expert_bytes(torch.bfloat16))))
    t0 = time.monotonic()
    model = _meta_model_with_buffering(args, slots, dev)
    build_s = time.monotonic() - t0
    model.setup_cache(1, 256)
    run = _decode(model, 1, cfg["over_capacity_tokens"], 2)
    out = {"layers": layers, "expert_bytes_total": layers * layer_bytes, "gpu_cap_bytes": cap,
           "gpu_total_bytes": total_gpu, "slots_per_layer": slots, "build_s": build_s,
           "max_allocated_bytes": torch.cuda.max_memory_allocated(dev), "capped": cap < total_gpu} | run
    print(f"over capacity: {layers} layers, {out['expert_bytes_total'] / 2**30:.1f} GiB of experts, GPU cap "
          f"{cap / 2**30:.1f} GiB: {run['tokens_per_s']:.2f} tok/s", flush=True)
    return out


def _meta_model_with_buffering(args: ModelArgs, slots: int, dev: torch.device) -> Transformer:
    """Experts go straight from the GPU's random generator into the pinned masters, never all on the GPU."""
    with torch.device("meta"):
        model = Transformer(args).to(torch.bfloat16)
    buffering = enable_expert_buffering(model, ExpertBufferingConfig(
        enabled=True, slots_per_layer=slots, policy="lru", prefetch=True), device=dev)
    model.to_empty(device=dev)
    model.tie_weights()
    model.reset_counters()
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for layer in buffering.masters:
            for row in layer:
                row.copy_(torch.empty(row.shape, dtype=row.dtype, device=dev).normal_(0.0, 0.02, generator=gen))
    return model.eval()


def _targets(report: dict, args: ModelArgs) -> dict:
    """The issue's targets, each with its largest gap."""
    live = [r for r in report["live"] if "skipped" not in r]
    half = args.num_experts // 2
    gaps = {}
    for row in report["sim"]:
        if row["slots"] == half and row["policy"] != "belady":
            key = f"{row['trace']}/b{row['batch']}"
            belady = next(r for r in report["sim"] if r["policy"] == "belady" and
                          (r["trace"], r["batch"], r["slots"]) == (row["trace"], row["batch"], half))
            points = 100 * (row["miss_rate"] - belady["miss_rate"])
            if key not in gaps or points < gaps[key]["points"]:
                # Prefetched copies are not misses; loads_points counts every copy against Belady's.
                gaps[key] = {"policy": row["policy"], "points": points,
                             "loads_points": 100 * (row["loads_per_access"] - belady["loads_per_access"])}
    h2d = [r["h2d_of_pinned"] for r in live if r.get("h2d_of_pinned") and r["misses_per_step"] > 0]
    bound = [r["vs_bound"] for r in live if r.get("vs_bound")]
    return {"best_online_vs_belady_at_half_points": gaps,
            "h2d_of_pinned_min": min(h2d, default=None), "h2d_of_pinned_median": _median(h2d),
            "vs_bound_max": max(bound, default=None), "vs_bound_median": _median(bound),
            "memory_reduction_within_10pct": _reductions(live, args)}


def _reductions(live: list[dict], args: ModelArgs) -> dict:
    """Per trace and batch, the fewest slots whose best run keeps >= 90% of all-resident tokens/s, and of
    the best run with every slot (the same code path: routing syncs without misses)."""
    out = {}
    for key in sorted({(r["trace"], r["batch"]) for r in live}):
        runs = [r for r in live if (r["trace"], r["batch"]) == key]
        full = max((r["tokens_per_s"] for r in runs if r["slots"] == args.num_experts), default=None)
        resident = min((r["slots"] for r in runs if r["vs_resident"] >= 0.9), default=None)
        pooled = min((r["slots"] for r in runs if full and r["tokens_per_s"] >= 0.9 * full), default=None)
        out[f"{key[0]}/b{key[1]}"] = {
            "slots": resident, "expert_memory_reduction": args.num_experts / resident if resident else None,
            "slots_vs_all_slots": pooled, "reduction_vs_all_slots": args.num_experts / pooled if pooled else None}
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "buffering.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "buffering.md").write_text(_markdown(report))
    _plot(out / "buffering.png", report)
    print(f"wrote {out}/buffering.{{json,md,png}} in {report['seconds']} s")


def _markdown(report: dict) -> str:
    m, t = report["model"], report["targets"]
    shape = f"H={m['hidden_size']}, F={m['intermediate_size']}, E={m['num_experts']}, top-{m['top_k']}"
    lines = [f"# Expert buffering: {m['num_layers']} layers of {shape} ({report['dtype']}, {report['device']})", "",
             f"Pinned H2D bandwidth (measured in this run): {_f(report['pinned_h2d_GBps'])} GB/s; one expert "
             f"{report['expert_bytes'] / 2**20:.0f} MiB. Traces: " + "; ".join(
                 f"**{k}**: {v['label']}" for k, v in report["traces"].items()), "",
             "| trace/batch | resident eager tok/s | resident graphs tok/s |", "|---|---|---|"]
    for key, row in report["resident"].items():
        lines.append(f"| {key} | {_f(row['eager']['tokens_per_s'])} | {_f(row.get('graphs', {}).get('tokens_per_s'))} |")
    lines += ["", "Live decode (eager; vs bound = time / (resident eager time + copied bytes / pinned bandwidth)):", "",
              "| trace | B | slots | expert GiB | policy | tok/s | vs resident | miss rate | recall | H2D of pinned "
              "| vs bound |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["live"]:
        if "skipped" in r:
            continue
        lines.append(f"| {r['trace']} | {r['batch']} | {r['slots']} | {r['expert_GiB']:.2f} | {r['policy']}"
                     f"{'+prefetch' if r['prefetch'] else ''} | {_f(r['tokens_per_s'])} | {_f(r['vs_resident'])} | "
                     f"{r['miss_rate']:.1%} | {_f(r['prefetch_recall'])} | {_f(r['h2d_of_pinned'])} | {_f(r['vs_bound'])} |")
    skipped = sum("skipped" in r for r in report["live"])
    lines += ["", f"Runs skipped for the time budget: {skipped}.", "", "## Targets", "",
              "Best online policy (prefetch where a predictor exists) minus Belady at half the experts resident, "
              "cache-sim over the whole trace (percentage points): " + ", ".join(
                  f"{k} {v['policy']} {v['points']:+.1f} (copies {v['loads_points']:+.1f})"
                  for k, v in t["best_online_vs_belady_at_half_points"].items()) + " (target <= +5; Belady "
              "is demand-only, so prefetch can beat its misses, not its copies).",
              f"H2D throughput while copying / pinned bandwidth: min {_f(t['h2d_of_pinned_min'])}, median "
              f"{_f(t['h2d_of_pinned_median'])} (target >= 0.85).",
              f"Decode time / bound: max {_f(t['vs_bound_max'])}, median {_f(t['vs_bound_median'])} (target <= 1.2).",
              "Largest expert-memory reduction within 10% of all-resident (eager) decode: " + ", ".join(
                  f"{k} {_f(v['expert_memory_reduction'])}x ({v['slots']} slots)"
                  for k, v in t["memory_reduction_within_10pct"].items()) + "; within 10% of buffering with "
              "every slot (same syncs, no misses): " + ", ".join(
                  f"{k} {_f(v['reduction_vs_all_slots'])}x" for k, v in t["memory_reduction_within_10pct"].items()),
              "", _over_capacity_line(report)]
    return "\n".join(lines) + "\n"


def _over_capacity_line(report: dict) -> str:
    o = report["over_capacity"]
    if "skipped" in o:
        return f"Over-capacity run skipped ({o['skipped']})."
    return (f"Over capacity: {o['layers']} Mixtral-8x7B layers, {o['expert_bytes_total'] / 2**30:.1f} GiB of experts "
            f"in pinned host memory against {o['gpu_cap_bytes'] / 2**30:.1f} GiB of GPU memory allowed "
            f"({'capped with set_per_process_memory_fraction' if o['capped'] else 'the whole GPU'}); "
            f"{o['slots_per_layer']} slots per layer: {o['tokens_per_s']:.2f} tok/s at batch 1 "
            f"(miss rate {o['miss_rate']:.1%}, peak allocated {o['max_allocated_bytes'] / 2**30:.1f} GiB).")


def _plot(path: Path, report: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(report["traces"])
    fig, axes = plt.subplots(len(BATCHES), len(names), figsize=(5 * len(names), 7), squeeze=False)
    for i, batch in enumerate(BATCHES):
        for j, name in enumerate(names):
            ax = axes[i][j]
            runs = [r for r in report["live"] if "skipped" not in r and (r["trace"], r["batch"]) == (name, batch)]
            for label in dict.fromkeys(f"{r['policy']}{'+pf' if r['prefetch'] else ''}" for r in runs):
                pts = [(r["expert_GiB"], r["tokens_per_s"]) for r in runs
                       if f"{r['policy']}{'+pf' if r['prefetch'] else ''}" == label]
                ax.plot(*zip(*pts), marker="o", label=label)
            resident = report["resident"].get(f"{name}/b{batch}")
            if resident:
                ax.axhline(resident["eager"]["tokens_per_s"], color="k", ls="--", label="all resident (eager)")
            ax.set(title=f"{name}, batch {batch}", xlabel="GPU expert memory (GiB)", ylabel="decode tok/s")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _f(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _sync(model: Transformer) -> None:
    if model.output.weight.is_cuda:
        torch.cuda.synchronize()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        # Hand cached pinned blocks back before pinning the next model (the API moved between releases).
        release = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
        if release is not None:
            release()


def _host_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 64 << 30


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
