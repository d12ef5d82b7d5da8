"""Issue 9's seed techniques measured on the demo model: adaptive top-p, expert pruning, SCMoE, static gating.

Scores a slice of the committed heldout.txt that lies past the routing trace's tokens (pruning is fitted on
the trace, so it is scored out of sample), teacher-forced in windows of 512. Quality: perplexity, next-token
accuracy and agreement with the full model's argmax; speed: CPU tokens/s. Writes OUT/seed_techniques.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from moe_runtime.config import GatingConfig, RoutingConfig
from moe_runtime.contrast import PLAUSIBILITY, contrast_logits, weak_model
from moe_runtime.generate import SamplingParams, generate
from moe_runtime.routing_policy import apply_routing_policy
from moe_runtime.tokenizer import load_tokenizer
from moe_runtime.traces import Trace, load_trace
from moe_runtime.weights import load_checkpoint

# B windows per forward, S window length, N scored positions, L layers, K top-k, V vocab

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
PRUNE_KEEP = (6, 5, 4)
ALPHAS = (0.1, 0.5, 1.0)
CAPACITY_FRACTIONS = (0.25, 0.5)  # GShard capacity factor 1.0 and 2.0 for E=8, top-2
QUALITY_BUDGET = 0.01  # issue 9: the adaptive threshold whose perplexity is within 1% of the full model's


@dataclass
class Scored:
    """Per scored position: NLL [N], argmax [N], true next token [N] and whether SCMoE's plausibility mask
    excluded the true token [N] (all False otherwise)."""

    nll: torch.Tensor
    argmax: torch.Tensor
    target: torch.Tensor
    excluded: torch.Tensor

    def summary(self, full: Scored | None, speed: dict) -> dict:
        """Quality (against `full` where given) and the _speed() numbers."""
        ppl = math.exp(float(self.nll.mean()))
        out = {"ppl": round(ppl, 4), "accuracy": round(float((self.argmax == self.target).float().mean()), 4),
               **speed}
        if full is not None:
            out["ppl_change_pct"] = round(100 * (ppl / math.exp(float(full.nll.mean())) - 1), 2)
            out["agreement"] = round(float((self.argmax == full.argmax).float().mean()), 4)
        return out


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    model = load_checkpoint(model_dir)
    windows = _windows(model_dir, model.args.vocab_size, args.offset, args.tokens, args.seq_len)
    tokens = sum(w.numel() for w in windows)
    model.setup_cache(args.batch, args.seq_len)
    full = _forward(model, windows, args.batch)
    report = {
        "model": str(model_dir), "device": f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)", "dtype": "float32", "heldout_tokens": [args.offset, args.offset + tokens],
        "windows": len(windows), "seq_len": args.seq_len, "batch_windows": args.batch,
        "trace": str(model_dir / "traces" / "heldout.npz"), "full": full.summary(None, _speed(model, windows, args.batch, lambda on: None)),
    }
    report["full"]["experts_per_token"] = float(model.args.top_k)
    report["adaptive"] = _adaptive(model, windows, args.batch, full, tokens)
    report["adaptive_choice"] = _adaptive_choice(report["adaptive"])
    report["pruning"] = _pruning(model, windows, args.batch, full, report["trace"])
    report["scmoe"] = _scmoe(model, windows, args.batch, full)
    report["static"] = _static(model, windows, args.batch, full, tokens)
    report["decode"] = _decode(model, windows[0][:32].tolist(), args.decode_tokens, report["adaptive_choice"])
    _write(Path(args.out), report)


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/tiny-stdlib-moe", help="checkpoint directory")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    p.add_argument("--offset", type=int, default=8192, help="first held-out token scored (the trace holds 8192)")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored")
    p.add_argument("--seq-len", type=int, default=512, help="window length (training.json's eval protocol)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward (static gating's T = batch * 512)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per decode measurement")
    return p.parse_args()


def _windows(model_dir: Path, vocab: int, offset: int, count: int, seq_len: int) -> list[torch.Tensor]:
    tokenizer = load_tokenizer(model_dir, vocab)
    ids = torch.tensor(tokenizer.encode((model_dir / "heldout.txt").read_text(encoding="utf-8")))
    return [w for w in ids[offset : offset + count].split(seq_len) if w.numel() == seq_len]  # full ones only


@torch.no_grad()
def _forward(model, windows: list[torch.Tensor], batch: int, contrast_alpha: float | None = None) -> Scored:
    """Teacher-forced scoring of every window; with contrast_alpha the SCMoE scores (weak model = the
    runtime's contrast.WeakModel, its own KV cache): argmax of the plausibility-masked contrast, NLL of
    the unmasked one (the mask gives excluded true tokens probability 0)."""
    parts = []
    for start in range(0, len(windows), batch):
        x = torch.stack(windows[start : start + batch])  # [B, S]
        pos = torch.arange(x.shape[1]).expand_as(x)
        logits = model(x, pos, kv_len=x.shape[1])[:, :-1].flatten(0, 1).float()  # [B*(S-1), V]
        argmax, excluded = logits.argmax(-1), torch.zeros(logits.shape[0], dtype=torch.bool)
        target = x[:, 1:].flatten()
        if contrast_alpha is not None:
            weak = weak_model(model).forward(model, x, pos, None, kv_len=x.shape[1])[:, :-1].flatten(0, 1)
            masked = contrast_logits(logits, weak, contrast_alpha)
            argmax, excluded = masked.argmax(-1), masked.gather(-1, target[:, None]).squeeze(-1).isinf()
            strong_lp, weak_lp = torch.log_softmax(logits, -1), torch.log_softmax(weak.float(), -1)
            logits = strong_lp + contrast_alpha * (strong_lp - weak_lp)
        nll = -torch.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1)
        parts.append((nll, argmax, target, excluded))
    return Scored(*(torch.cat(p) for p in zip(*parts)))


@torch.no_grad()
def _speed(model, windows, batch: int, set_variant, contrast_alpha: float | None = None, repeats: int = 10) -> dict:
    """CPU prefill speed of one batch of windows, interleaved with the full model so that a shared CPU's
    drift cancels: set_variant(True / False) switches the option on / off. Best of `repeats` each after a
    warm-up; tokens/s of the whole forward, ms inside the MoE blocks (router + experts; CPU is synchronous),
    and both as speed-ups over the full model. contrast_alpha: the weak forward and contrast are timed too."""
    x = torch.stack(windows[:batch])  # [B, S]
    pos = torch.arange(x.shape[1]).expand_as(x)
    clock = {"moe": 0.0}
    hooks = [h for moe in model.moe_blocks for h in (
        moe.register_forward_pre_hook(lambda m, _i: clock.__setitem__(id(m), time.perf_counter())),
        moe.register_forward_hook(lambda m, _i, _o: clock.__setitem__("moe", clock["moe"] + time.perf_counter()
                                                                      - clock[id(m)])))]

    def step(on: bool) -> tuple[float, float]:
        set_variant(on)
        clock["moe"], begin = 0.0, time.perf_counter()
        logits = model(x, pos, kv_len=x.shape[1])  # [B, S, V]
        if on and contrast_alpha is not None:
            weak = weak_model(model).forward(model, x, pos, None, kv_len=x.shape[1])
            contrast_logits(logits.flatten(0, 1), weak.flatten(0, 1), contrast_alpha)
        return time.perf_counter() - begin, clock["moe"]

    try:
        runs = [(step(False), step(True)) for _ in range(repeats + 1)][1:]  # the first pair warms up
    finally:
        for hook in hooks:
            hook.remove()
    (full_s, full_moe), (var_s, var_moe) = ([min(r[i][j] for r in runs) for j in (0, 1)] for i in (0, 1))
    return {"prefill_tokens_per_s_cpu": round(x.numel() / var_s), "moe_ms_per_forward_cpu": round(1000 * var_moe, 1),
            "speedup_vs_full": round(full_s / var_s, 3), "moe_speedup_vs_full": round(full_moe / var_moe, 3)}


def _experts_per_token(model, tokens: int) -> float:
    """Token-slots routed per token and layer, from the load counters (dropped slots are not counted)."""
    return round(float(model.expert_load().sum()) / (tokens * model.args.num_layers), 4)


def _routing_switch(model, config: RoutingConfig, trace: Trace | None = None):
    """set_variant for _speed: `config` on, plain routing off."""
    return lambda on: apply_routing_policy(model, config if on else RoutingConfig(), trace)


def _adaptive(model, windows, batch: int, full: Scored, tokens: int) -> list[dict]:
    rows = []
    for top_p in THRESHOLDS:
        apply_routing_policy(model, RoutingConfig(adaptive_top_p=top_p))
        model.reset_counters()
        scored = _forward(model, windows, batch)
        experts = _experts_per_token(model, tokens)  # before _speed's forwards add to the counters
        speed = _speed(model, windows, batch, _routing_switch(model, RoutingConfig(adaptive_top_p=top_p)))
        rows.append({"adaptive_top_p": top_p, **scored.summary(full, speed), "experts_per_token": experts})
    apply_routing_policy(model, RoutingConfig())
    return rows


def _adaptive_choice(rows: list[dict]) -> dict | None:
    """The lowest threshold whose perplexity is within QUALITY_BUDGET of the full model's."""
    within = [r for r in rows if r["ppl_change_pct"] <= 100 * QUALITY_BUDGET]
    return min(within, key=lambda r: r["adaptive_top_p"]) if within else None


def _pruning(model, windows, batch: int, full: Scored, trace_path: str) -> list[dict]:
    rows, params = [], sum(p.numel() * p.element_size() for p in model.parameters())
    trace = load_trace(trace_path)
    for keep in PRUNE_KEEP:
        config = RoutingConfig(prune_keep=keep, prune_trace=trace_path)
        report = apply_routing_policy(model, config, trace)
        scored = _forward(model, windows, batch)
        speed = _speed(model, windows, batch, _routing_switch(model, config, trace))
        rows.append({"prune_keep": keep, **scored.summary(full, speed), "kept": report.to_dict()["kept"],
                     "pruned_bytes_fp32": report.pruned_bytes, "pruned_bytes_bf16": report.pruned_bytes // 2,
                     "pruned_share_of_expert_weights": round(report.pruned_bytes / report.expert_bytes, 4),
                     "pruned_share_of_model": round(report.pruned_bytes / params, 4)})
    apply_routing_policy(model, RoutingConfig())
    return rows


def _scmoe(model, windows, batch: int, full: Scored) -> list[dict]:
    rows = []
    for alpha in ALPHAS:
        scored = _forward(model, windows, batch, contrast_alpha=alpha)
        speed = _speed(model, windows, batch, lambda on: None, contrast_alpha=alpha)
        rows.append({"contrast_alpha": alpha, **scored.summary(full, speed),
                     "true_token_excluded": round(float(scored.excluded.float().mean()), 4)})
    return rows


def _static(model, windows, batch: int, full: Scored, tokens: int) -> list[dict]:
    rows = []
    for fraction in CAPACITY_FRACTIONS:
        static = GatingConfig("static", fraction)
        model.set_gating(static)
        model.reset_counters()
        scored = _forward(model, windows, batch)
        dropped = float(model.dropped_slots()) / (tokens * model.args.top_k * model.args.num_layers)
        speed = _speed(model, windows, batch, lambda on, g=static: model.set_gating(g if on else GatingConfig()))
        rows.append({"capacity_fraction": fraction, "gshard_capacity_factor": fraction * model.args.num_experts
                     / model.args.top_k, **scored.summary(full, speed), "dropped_slot_fraction": round(dropped, 4)})
    model.set_gating(GatingConfig())
    return rows


def _decode(model, prompt: list[int], new_tokens: int, choice: dict | None) -> list[dict]:
    """generate() tokens/s at batch 1 (CPU; includes the prompt's prefill), best of 5 interleaved with
    the full model, after a warm-up."""
    cases = [("scmoe alpha 0.5", RoutingConfig(), 0.5)]
    if choice is not None:
        cases.insert(0, (f"adaptive top_p {choice['adaptive_top_p']}", RoutingConfig(adaptive_top_p=choice['adaptive_top_p']), 0.0))
    rows = []
    for name, routing, alpha in cases:
        def run(config: RoutingConfig, contrast_alpha: float) -> float:
            apply_routing_policy(model, config)
            begin = time.perf_counter()
            generate(model, [prompt], SamplingParams(max_new_tokens=new_tokens, ignore_eos=True,
                                                     contrast_alpha=contrast_alpha))
            return time.perf_counter() - begin

        pairs = [(run(RoutingConfig(), 0.0), run(routing, alpha)) for _ in range(6)][1:]
        full_s, var_s = min(p[0] for p in pairs), min(p[1] for p in pairs)
        rows.append({"case": name, "decode_tokens_per_s_cpu": round(new_tokens / var_s, 1),
                     "full_decode_tokens_per_s_cpu": round(new_tokens / full_s, 1),
                     "speedup_vs_full": round(full_s / var_s, 3)})
    apply_routing_policy(model, RoutingConfig())
    return rows


def _write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "seed_techniques.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "seed_techniques.md").write_text(_markdown(report))
    print(_markdown(report))


def _markdown(r: dict) -> str:
    full = r["full"]
    head = ("| perplexity | change | accuracy | agreement with full | experts / token | prefill tok/s (CPU, x full) "
            "| MoE blocks ms / forward (CPU, x full) |")
    lines = [
        f"# Seed techniques on the demo model ({r['model']})", "",
        f"{r['device']}, {r['dtype']}; held-out tokens {r['heldout_tokens'][0]}..{r['heldout_tokens'][1]} (past "
        f"the trace `{r['trace']}` that pruning is fitted on), {r['windows']} windows of {r['seq_len']}, "
        f"{r['batch_windows']} per forward. Accuracy: argmax = true next token; agreement: argmax = the full "
        "model's argmax.", "",
        f"Full model: perplexity **{full['ppl']}**, accuracy {full['accuracy']}, {full['experts_per_token']:g} "
        f"experts/token, {full['prefill_tokens_per_s_cpu']} tokens/s prefill (CPU; {full['moe_ms_per_forward_cpu']} ms "
        f"of each {r['batch_windows']}x{r['seq_len']} forward in the MoE blocks). Speed: best of 10 forwards after a "
        "warm-up, interleaved with the full model's; x full = speed-up over it in the same session (the full "
        f"model paired with itself reads {full['speedup_vs_full']:.2f}x / {full['moe_speedup_vs_full']:.2f}x: "
        "the noise floor of this CPU).", "",
        "## Token-adaptive routing (`--adaptive-top-p P`)", "", "| P " + head, "|---" * 8 + "|",
    ]
    lines += [_row(x["adaptive_top_p"], x, x["experts_per_token"]) for x in r["adaptive"]]
    choice = r["adaptive_choice"]
    if choice:
        lines += ["", f"Lowest threshold within {100 * QUALITY_BUDGET:g}% perplexity: **P = {choice['adaptive_top_p']}**, "
                  f"{choice['experts_per_token']} experts/token ({100 * (1 - choice['experts_per_token'] / 2):.1f}% "
                  f"fewer expert slots), perplexity {choice['ppl_change_pct']:+}%."]
    lines += ["", "## Expert pruning from the trace (`--prune-experts N --prune-trace FILE`)", "",
              "| N " + head + " pruned weights (fp32 / bf16 checkpoint) |", "|---" * 9 + "|"]
    lines += [_row(x["prune_keep"], x, 2) + f" {x['pruned_bytes_fp32'] / 2**20:.1f} / "
              f"{x['pruned_bytes_bf16'] / 2**20:.1f} MiB ({100 * x['pruned_share_of_model']:.0f}% of the model) |"
              for x in r["pruning"]]
    lines += ["", f"## SCMoE self-contrast (`--contrast-alpha A`, weak = rank-2 expert alone, plausibility "
              f"{PLAUSIBILITY})", "", "Perplexity of the unmasked contrast (1 + A) log p - A log p_weak; accuracy and "
              "agreement of the plausibility-masked argmax (what greedy decoding emits). The weak pass doubles "
              "the forward cost.", "", "| A " + head + " true token masked |", "|---" * 9 + "|"]
    lines += [_row(x["contrast_alpha"], x, 2) + f" {100 * x['true_token_excluded']:.1f}% |" for x in r["scmoe"]]
    return "\n".join(lines + _markdown_static_and_decode(r, head)) + "\n"


def _markdown_static_and_decode(r: dict, head: str) -> list[str]:
    lines = ["", f"## Static gating vs dynamic (T = {r['batch_windows'] * r['seq_len']} tokens per forward)", "",
             "| capacity fraction f (GShard cf) " + head + " dropped slots |", "|---" * 9 + "|"]
    lines += [_row(f"{x['capacity_fraction']} ({x['gshard_capacity_factor']:g})", x, 2)
              + f" {100 * x['dropped_slot_fraction']:.2f}% |" for x in r["static"]]
    lines += ["", "## Decode (CPU, batch 1, greedy, generate() incl. a 32-token prefill)", "",
              "| case | tokens/s | full model, same session | speed-up |", "|---|---|---|---|"]
    lines += [f"| {x['case']} | {x['decode_tokens_per_s_cpu']} | {x['full_decode_tokens_per_s_cpu']} | "
              f"{x['speedup_vs_full']:.2f}x |" for x in r["decode"]]
    return lines


def _row(name, x: dict, experts: float) -> str:
    return (f"| {name} | {x['ppl']} | {x['ppl_change_pct']:+}% | {x['accuracy']} | {x['agreement']} | "
            f"{experts:g} | {x['prefill_tokens_per_s_cpu']} ({x['speedup_vs_full']:.2f}x) | "
            f"{x['moe_ms_per_forward_cpu']} ({x['moe_speedup_vs_full']:.2f}x) |")


if __name__ == "__main__":
    main()
