"""Decoding against the weight-streaming bound (issue 8, target 3): our runtime vs transformers, side by side.

Owns the decode benchmark: a Mixtral-8x7B-shaped model with 4 full-width layers and random bf16 weights,
one decode step at batch 1, 16, 64 through CUDA graphs and eager, generate() end to end, a 2048-token
prefill, and transformers' MixtralForCausalLM with the same config, in one run. Bounds use rates measured
in the same run (bench/moe_layer.py's copy bandwidth and bf16 GEMM). Writes OUT/decode.json and
OUT/decode.md; timings are results, never assertions. `--quick`: the tiny preset on CPU, end to end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import (  # shared with every bench
    _device_name,
    _free_memory,
    _measure_rates,
    _versions,
    guarded,
)

from moe_runtime.cuda_graphs import decode_graphs
from moe_runtime.gating import route
from moe_runtime.generate import SamplingParams, decode, generate, next_tokens, prefill
from moe_runtime.model import ModelArgs
from moe_runtime.weights import init_random

# B batch, L layers, E experts, K top-k, H hidden, F expert ffn, V vocab, NH/NKV heads, D head dim

FULL = {"model": "mixtral-8x7b", "layers": 4, "batches": [1, 16, 64], "prompt": 128, "steps": 32,
        "prefill": 2048, "dtype": torch.bfloat16}
QUICK = {"model": "tiny", "layers": 2, "batches": [1, 4, 8], "prompt": 16, "steps": 4, "prefill": 64,
         "dtype": torch.float32}
WARMUP_STEPS = 3
HF_IMPLEMENTATIONS = ("batched_mm", "grouped_mm")


def main() -> None:
    opts = _parse_args()
    setup = QUICK if opts.quick else FULL
    dev = torch.device("cuda" if torch.cuda.is_available() and not opts.quick else "cpu")
    margs = ModelArgs.from_name(setup["model"]).with_(num_layers=setup["layers"])
    rates = _measure_rates(dev, opts.quick)
    print(f"device {_device_name(dev)}: copy {rates['copy_GBps']:.3g} GB/s, bf16 GEMM {rates['gemm_TFLOPs']:.3g} TFLOP/s")
    ours = _bench_ours(margs, setup, dev, rates)
    _free_memory()
    theirs = _bench_transformers(margs, setup, dev)
    report = {
        "device": _device_name(dev),
        "versions": _versions(),
        "model": margs.to_dict() | {"dtype": str(setup["dtype"]).removeprefix("torch.")},
        "setup": {k: v for k, v in setup.items() if k != "dtype"} | {"warmup_steps": WARMUP_STEPS},
        "rates": rates,
        "ours": ours,
        "transformers": theirs,
        "notes": "ms per decode step of the whole batch, prompts of `prompt` tokens, greedy; step_ms = host loop "
        "of decode() with the ids fed back on the device (no host read), wall time / steps; generate_step_ms = "
        "(generate(steps+1 tokens) - generate(1 token)) / steps, host reads and stop checks included; bound = "
        "max(bytes / copy bandwidth, FLOPs / GEMM rate) with bytes = experts the routing touched + every other "
        "weight (embedding rows read) + KV cache read; transformers: manual decode loop with its dynamic cache "
        "per experts implementation, and generate() as shipped (implementation counted per experts call).",
    }
    _write(Path(opts.out), report)


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny preset on CPU, few steps (smoke test)")
    return p.parse_args()


# ---- ours ------------------------------------------------------------------------------------------


def _bench_ours(margs: ModelArgs, setup: dict, dev: torch.device, rates: dict) -> dict:
    t0 = time.perf_counter()
    model = init_random(margs, seed=0, device=dev, dtype=setup["dtype"])
    cache_len = max(setup["prefill"], setup["prompt"] + 2 * (WARMUP_STEPS + setup["steps"])) + 16
    model.setup_cache(max(setup["batches"]), cache_len)
    print(f"ours: model ready in {time.perf_counter() - t0:.1f} s", flush=True)
    out = {"decode": {}, "prefill": _prefill(model, setup, rates)}
    print(f"ours prefill {setup['prefill']}: {_fmt_ms(out['prefill'])}", flush=True)
    for batch in setup["batches"]:
        out["decode"][batch] = cell = _decode_cell(model, batch, setup, rates)
        print(f"ours B={batch}: graph {cell['graph_step_ms']:.3g} ms, eager {cell['eager_step_ms']:.3g} ms, "
              f"generate {cell['generate_step_ms']:.3g} ms/step, bound {cell['bound']['ms']:.3g} ms", flush=True)
    graphs = decode_graphs(model)
    out["graphs_captured"] = sorted(str(k) for k in graphs.graphs) if graphs else []
    out["graphs_declined"] = sorted(str(k) for k in graphs.declined) if graphs else []
    del model, graphs
    return out


def _decode_cell(model, batch: int, setup: dict, rates: dict) -> dict:
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, model.args.vocab_size, (setup["prompt"],), generator=gen).tolist()
               for _ in range(batch)]
    first = torch.stack([prefill(model, p, row) for row, p in enumerate(prompts)]).float().argmax(-1)  # [B]
    touched = _touched_experts(model, first, setup["prompt"], batch)
    cell = {"distinct_experts_per_layer": touched}
    for mode, graphs in (("graph", True), ("eager", False)):
        ms, static = _step_ms(model, first, setup["prompt"], setup["steps"], graphs)
        cell[f"{mode}_step_ms"], cell[f"{mode}_used_graphs"] = ms, static
    cell["generate_step_ms"] = _generate_step_ms(model, prompts, setup["steps"])
    kv_read = setup["prompt"] + WARMUP_STEPS + setup["steps"] / 2  # mean attended length in the timed steps
    cell["bound"] = _decode_bound(model, batch, touched, kv_read, rates)
    cell["graph_tokens_per_s"] = 1e3 * batch / cell["graph_step_ms"]
    cell["eager_tokens_per_s"] = 1e3 * batch / cell["eager_step_ms"]
    cell["generate_tokens_per_s"] = 1e3 * batch / cell["generate_step_ms"]
    cell["graph_ratio_bound"] = cell["graph_step_ms"] / cell["bound"]["ms"]
    return cell


def _step_ms(model, first: torch.Tensor, start: int, steps: int, cuda_graphs: bool) -> tuple[float, bool]:
    """Wall ms per decode() step, ids fed back on the device; rows 0..B-1 from position `start`."""
    batch = first.shape[0]
    rows, greedy, none = list(range(batch)), [0.0] * batch, [None] * batch
    tokens, positions, static = first, [start] * batch, True
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            _sync()
            t0 = time.perf_counter()
        out = decode(model, tokens, positions, rows, cuda_graphs=cuda_graphs)
        static &= out.static
        tokens = next_tokens(out, greedy, greedy, none)
        positions = [p + 1 for p in positions]
    _sync()
    return 1e3 * (time.perf_counter() - t0) / steps, static


def _generate_step_ms(model, prompts: list[list[int]], steps: int) -> float:
    """generate() per decode step: (time for steps+1 tokens - time for 1 token) / steps (prefill cancels)."""
    def timed(n: int) -> float:
        _sync()
        t0 = time.perf_counter()
        generate(model, prompts, SamplingParams(max_new_tokens=n, ignore_eos=True))
        _sync()
        return time.perf_counter() - t0

    timed(steps + 1)  # warm-up: graphs for this batch and attended length
    return 1e3 * (min(timed(steps + 1) for _ in range(2)) - min(timed(1) for _ in range(2))) / steps


def _touched_experts(model, first: torch.Tensor, start: int, batch: int) -> float:
    """Mean distinct experts per layer per decode step, from the routing of a few eager steps (untimed)."""
    seen: list[int] = []
    hooks = [moe.router.register_forward_hook(
        lambda mod, inp, logits, k=moe.args.top_k: seen.append(route(logits, k).topk_ids.unique().numel()))
        for moe in model.moe_blocks]
    try:
        tokens, positions = first, [start] * batch
        for _ in range(WARMUP_STEPS):
            out = decode(model, tokens, positions, list(range(batch)), cuda_graphs=False)
            tokens, positions = out.logits.float().argmax(-1), [p + 1 for p in positions]
    finally:
        for hook in hooks:
            hook.remove()
    return statistics.mean(seen)


def _decode_bound(model, batch: int, touched: float, kv_len: float, rates: dict) -> dict:
    """Fewest bytes one step must move and its FLOPs, over the measured rates."""
    a, elem = model.args, model.output.weight.element_size()
    expert_bytes = a.expert_bytes(model.output.weight.dtype)
    params = dict(model.named_parameters())
    dense = sum(p.numel() for n, p in params.items() if not n.endswith((".w13", ".w2", "tok_embeddings.weight")))
    kv_bytes = a.num_layers * batch * (kv_len + 1) * 2 * a.num_kv_heads * a.head_dim * elem  # read + the write
    nbytes = {
        "experts": a.num_layers * touched * expert_bytes,
        "dense_weights": dense * elem,
        "embedding_rows": batch * a.hidden_size * elem,
        "kv_cache": kv_bytes,
    }
    per_token_params = dense + a.num_layers * a.top_k * 3 * a.hidden_size * a.intermediate_size
    attention = 4 * a.num_layers * a.num_heads * a.head_dim * kv_len  # QK^T and PV per token
    flops = batch * (2 * per_token_params + attention)
    total = sum(nbytes.values())
    ms = 1e3 * max(total / (rates["copy_GBps"] * 1e9), flops / (rates["gemm_TFLOPs"] * 1e12))
    return {"bytes": nbytes, "total_bytes": total, "flops": flops, "ms": ms}


def _prefill(model, setup: dict, rates: dict) -> dict:
    n = setup["prefill"]
    ids = torch.randint(0, model.args.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    ms = _median_ms(lambda: prefill(model, ids, 0), reps=3 if setup is QUICK else 10)
    bound = _prefill_bound(model.args, n, rates)
    return {"tokens": n, "ms": ms, "bound": bound, "ratio_bound": ms / bound["ms"],
            "tokens_per_s": 1e3 * n / ms}


def _prefill_bound(a: ModelArgs, n: int, rates: dict) -> dict:
    """FLOPs the prompt needs (causal attention; the output head for the last token only) at the GEMM rate."""
    attn_proj = 2 * a.hidden_size * a.head_dim * (2 * a.num_heads + 2 * a.num_kv_heads)  # wq, wo, wk, wv
    experts = 2 * a.top_k * 3 * a.hidden_size * a.intermediate_size
    router = 2 * a.hidden_size * a.num_experts
    per_token = a.num_layers * (attn_proj + experts + router)
    attention = a.num_layers * 4 * a.num_heads * a.head_dim * n * (n + 1) / 2
    flops = n * per_token + attention + 2 * a.hidden_size * a.vocab_size
    return {"flops": flops, "ms": 1e3 * flops / (rates["gemm_TFLOPs"] * 1e12)}


# ---- transformers ----------------------------------------------------------------------------------


def _bench_transformers(margs: ModelArgs, setup: dict, dev: torch.device) -> dict:
    try:
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError as exc:
        return {"status": f"unavailable: {exc}"}
    t0 = time.perf_counter()
    config = MixtralConfig(
        vocab_size=margs.vocab_size, hidden_size=margs.hidden_size, intermediate_size=margs.intermediate_size,
        num_hidden_layers=margs.num_layers, num_attention_heads=margs.num_heads,
        num_key_value_heads=margs.num_kv_heads, head_dim=margs.head_dim, num_local_experts=margs.num_experts,
        num_experts_per_tok=margs.top_k, rms_norm_eps=margs.rms_norm_eps, sliding_window=None,
        tie_word_embeddings=False,
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(setup["dtype"])  # built (and randomly initialised) in place, in the bench dtype
    try:
        with torch.device(dev):
            model = MixtralForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    print(f"transformers: model ready in {time.perf_counter() - t0:.1f} s", flush=True)
    out = _hf_measure(model, setup)
    del model
    return out


def _hf_measure(model, setup: dict) -> dict:
    calls = _count_experts_calls(model)
    default = model.config._experts_implementation
    out = {"default_experts_implementation": default, "decode": {}}
    with torch.inference_mode():
        out["prefill"] = _hf_prefill(model, setup, calls)
        print(f"transformers prefill {setup['prefill']}: {_fmt_ms(out['prefill'])}", flush=True)
        for batch in setup["batches"]:
            cell = out["decode"][batch] = {}
            for impl in HF_IMPLEMENTATIONS:
                cell[impl] = guarded(lambda impl=impl, b=batch: _hf_loop(model, b, setup, impl, calls))
                _set_impl(model, default)
            cell["generate"] = guarded(lambda b=batch: _hf_generate(model, b, setup, calls))
            print(f"transformers B={batch}: " + ", ".join(f"{k} {_fmt_ms(v)}" for k, v in cell.items()), flush=True)
    return out


def _count_experts_calls(model) -> Counter:
    """Count experts forwards per implementation: the registered functions are wrapped, eager is the rest."""
    calls: Counter = Counter()
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return calls
    for name in list(ALL_EXPERTS_FUNCTIONS.keys()):
        fn = ALL_EXPERTS_FUNCTIONS[name]

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        ALL_EXPERTS_FUNCTIONS[name] = counted
    for layer in model.model.layers:
        layer.mlp.experts.register_forward_hook(lambda *_: calls.update(["(all)"]))
    return calls


def _ran(calls: Counter, before: Counter) -> dict:
    delta = calls - before
    named = sum(v for k, v in delta.items() if k != "(all)")
    ran = {k: v for k, v in delta.items() if k != "(all)"}
    if delta["(all)"] > named:
        ran["eager"] = delta["(all)"] - named
    return ran


def _set_impl(model, impl: str) -> None:
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(impl)
    else:
        model.config._experts_implementation = impl


def _hf_prefill(model, setup: dict, calls: Counter) -> dict:
    n = setup["prefill"]
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=model.device)
    before = calls.copy()
    ms = _median_ms(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1),
                    reps=3 if setup is QUICK else 10)
    return {"tokens": n, "ms": ms, "experts_calls": _ran(calls, before)}


def _hf_loop(model, batch: int, setup: dict, impl: str, calls: Counter) -> dict:
    """Its forward in a manual greedy loop with its dynamic cache, under one experts implementation."""
    if impl == "batched_mm" and not _batched_mm_fits(model, batch):
        return {"status": "skipped: copies one expert per token-slot, would not fit in memory"}
    _set_impl(model, impl)
    ids = torch.randint(0, model.config.vocab_size, (batch, setup["prompt"]), device=model.device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    before = calls.copy()
    for i in range(WARMUP_STEPS + setup["steps"]):
        if i == WARMUP_STEPS:
            _sync()
            t0 = time.perf_counter()
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync()
    ms = 1e3 * (time.perf_counter() - t0) / setup["steps"]
    return {"status": "ok", "step_ms": ms, "tokens_per_s": 1e3 * batch / ms, "experts_calls": _ran(calls, before)}


def _hf_generate(model, batch: int, setup: dict, calls: Counter) -> dict:
    """generate() as shipped, greedy: (time for steps+1 tokens - time for 1) / steps."""
    ids = torch.randint(0, model.config.vocab_size, (batch, setup["prompt"]), device=model.device)
    mask = torch.ones_like(ids)

    def timed(n: int) -> float:
        _sync()
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)
        _sync()
        return time.perf_counter() - t0

    timed(2)  # warm-up
    before = calls.copy()
    ms = 1e3 * (min(timed(setup["steps"] + 1) for _ in range(2)) - min(timed(1) for _ in range(2))) / setup["steps"]
    return {"status": "ok", "step_ms": ms, "tokens_per_s": 1e3 * batch / ms, "experts_calls": _ran(calls, before)}


def _batched_mm_fits(model, batch: int) -> bool:
    if model.device.type != "cuda":
        return True
    c = model.config
    per_slot = 3 * c.hidden_size * c.intermediate_size * model.dtype.itemsize
    return batch * c.num_experts_per_tok * per_slot < 0.6 * torch.cuda.mem_get_info()[0]


# ---- output ------------------------------------------------------------------------------------------


def _write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _add_ratios(report)
    (out / "decode.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = _markdown(report)
    (out / "decode.md").write_text(table)
    print(f"\nwrote {out / 'decode.json'} and {out / 'decode.md'}\n")
    print(table)


def _hf_best(cell: dict) -> tuple[str | None, float | None]:
    timed = {k: v["step_ms"] for k, v in cell.items() if isinstance(v, dict) and "step_ms" in v}
    if not timed:
        return None, None
    best = min(timed, key=timed.get)
    return best, timed[best]


def _add_ratios(report: dict) -> None:
    hf = report["transformers"].get("decode", {})
    for batch, cell in report["ours"]["decode"].items():
        name, ms = _hf_best(hf.get(batch, {}))
        cell["transformers_best"] = name
        cell["speedup_vs_transformers_best"] = ms / cell["graph_step_ms"] if ms else None
        gen = hf.get(batch, {}).get("generate", {})
        cell["speedup_vs_transformers_generate"] = gen["step_ms"] / cell["graph_step_ms"] if "step_ms" in gen else None
    theirs = report["transformers"].get("prefill", {})
    ours = report["ours"]["prefill"]
    ours["speedup_vs_transformers"] = theirs["ms"] / ours["ms"] if "ms" in theirs else None


def _markdown(report: dict) -> str:
    r, m = report["rates"], report["model"]
    hf = report["transformers"].get("decode", {})
    lines = [
        f"Decode, {m['num_layers']}-layer Mixtral-8x7B shape ({m['dtype']}, random weights) on {report['device']} "
        f"(copy {r['copy_GBps']:.3g} GB/s, GEMM {r['gemm_TFLOPs']:.3g} TFLOP/s); torch {report['versions']['torch']}, "
        f"transformers {report['versions'].get('transformers')}. ms per step of the whole batch.",
        "",
        "| batch | bound | ours graph (x bound) | ours eager | ours generate() | tokens/s (graph) "
        "| transformers best (impl) | transformers generate() | speedup vs best / vs generate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for batch, c in report["ours"]["decode"].items():
        name, best = _hf_best(hf.get(batch, {}))
        gen = hf.get(batch, {}).get("generate", {})
        lines.append(
            f"| {batch} | {c['bound']['ms']:.3g} | {c['graph_step_ms']:.3g} ({c['graph_ratio_bound']:.2f}x)"
            f"{'' if c['graph_used_graphs'] else ' NO GRAPH'} | {c['eager_step_ms']:.3g} | {c['generate_step_ms']:.3g} "
            f"| {c['graph_tokens_per_s']:.4g} | {_num(best)} ({name}) | {_fmt_ms(gen)} {_impls(gen)} "
            f"| {_x(c['speedup_vs_transformers_best'])} / {_x(c['speedup_vs_transformers_generate'])} |"
        )
    p, hp = report["ours"]["prefill"], report["transformers"].get("prefill", {})
    lines += [
        "",
        f"Prefill of {p['tokens']} tokens: ours {p['ms']:.3g} ms ({p['ratio_bound']:.2f}x the FLOP bound "
        f"{p['bound']['ms']:.3g} ms), transformers {_fmt_ms(hp)} {_impls(hp)}; speedup {_x(p['speedup_vs_transformers'])}.",
    ]
    return "\n".join(lines) + "\n"


def _impls(cell: dict) -> str:
    calls = cell.get("experts_calls")
    return f"[{', '.join(sorted(calls))}]" if calls else ""


def _fmt_ms(cell: dict) -> str:
    for key in ("ms", "step_ms"):
        if key in cell:
            return f"{cell[key]:.3g} ms"
    return cell.get("status", "n/a").split(":")[0]


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _median_ms(fn, reps: int) -> float:
    fn()
    fn()  # warm-up
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()



if __name__ == "__main__":
    with torch.inference_mode():
        main()
