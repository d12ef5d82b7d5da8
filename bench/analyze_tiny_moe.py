"""Analyse the demo MoE of issue 9 with our runtime: held-out perplexity, expert load, co-activation, traces.

Loads the checkpoint through moe_runtime.weights, runs its committed heldout.txt in the windows that
training.json's eval protocol names, records every layer's routing with forward hooks on the routers and
writes OUT/tiny_moe.{json,md,png} plus a small routing trace MODEL/traces/heldout.npz. Numbers are
results, never assertions; the PNG needs matplotlib and is skipped without it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from moe_runtime.gating import route
from moe_runtime.tokenizer import load_tokenizer
from moe_runtime.traces import Trace, save_trace
from moe_runtime.weights import load_checkpoint

# N tokens, L layers, E experts, K top-k, B batch, S window length, V vocab

SKEW_TARGET = 2.0  # issue 9: the busiest expert of some layer gets >= 2x the mean load on held-out text


def main() -> None:
    args = _parse_args()
    model_dir = Path(args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    training = _training_json(model_dir)
    ids, text_sha = _heldout_ids(model_dir, training, args.max_tokens)
    seq_len = training.get("eval_protocol", {}).get("seq_len", 512)
    model = load_checkpoint(model_dir, device=device, dtype=dtype)
    start = time.monotonic()
    nll, count, topk_ids, topk_weights = run_heldout(model, ids, seq_len, args.batch)
    seconds = time.monotonic() - start
    num_experts, top_k = model.args.num_experts, model.args.top_k
    trace = Trace(topk_ids[: args.trace_tokens], topk_weights[: args.trace_tokens], num_experts)
    trace_path = Path(args.trace) if args.trace else model_dir / "traces" / "heldout.npz"
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    save_trace(trace_path, trace)
    report = {
        "model": str(model_dir), "device": _device_name(device), "dtype": args.dtype,
        "heldout_sha256": text_sha, "heldout_tokens": int(ids.numel()), "scored_tokens": count,
        "seq_len": seq_len, "seconds": round(seconds, 2), "heldout_loss": round(nll / count, 4),
        "heldout_ppl": round(math.exp(nll / count), 3),
        "training_heldout_ppl": training.get("heldout_ppl"), "num_experts": num_experts, "top_k": top_k,
        "layers": [layer_stats(topk_ids[:, layer], num_experts) for layer in range(topk_ids.shape[1])],
        "trace": {"path": str(trace_path), "tokens": trace.num_tokens, "bytes": trace_path.stat().st_size},
    }
    report["busiest_over_mean_max"] = max(s["busiest_over_mean"] for s in report["layers"])
    report["skew_target_met"] = bool(report["busiest_over_mean_max"] >= SKEW_TARGET)
    _write(Path(args.out), report)


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/tiny-stdlib-moe", help="checkpoint directory")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="runtime compute dtype")
    p.add_argument("--batch", type=int, default=16, help="windows per forward")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N held-out tokens")
    p.add_argument("--trace-tokens", type=int, default=8192, help="tokens kept in the routing trace")
    p.add_argument("--trace", default=None, help="trace path (default: MODEL/traces/heldout.npz)")
    return p.parse_args()


def _training_json(model_dir: Path) -> dict:
    path = model_dir / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _heldout_ids(model_dir: Path, training: dict, max_tokens: int | None) -> tuple[torch.Tensor, str]:
    """Token ids of the committed heldout.txt (EOS-separated files, as training wrote and scored them)."""
    text = (model_dir / "heldout.txt").read_text(encoding="utf-8")
    sha = hashlib.sha256(text.encode()).hexdigest()
    expected = training.get("corpus", {}).get("heldout_sha256")
    if expected and expected != sha:
        print(f"WARNING: heldout.txt sha256 {sha[:12]} differs from training.json's {expected[:12]}")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tokenizer = load_tokenizer(model_dir, vocab)
    if tokenizer is None:
        sys.exit(f"{model_dir}: no tokenizer.json")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    return (ids[:max_tokens] if max_tokens else ids), sha


@torch.no_grad()
def run_heldout(model, ids: torch.Tensor, seq_len: int, batch: int):
    """Score non-overlapping windows; return (sum NLL, scored tokens, topk_ids [N, L, K], topk_weights)."""
    device = model.output.weight.device
    model.setup_cache(batch, seq_len)
    model.reset_counters()
    captured: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in model.layers]
    hooks = [layer.moe.router.register_forward_hook(_recorder(captured[i], model.args.top_k))
             for i, layer in enumerate(model.layers)]
    windows = [w for w in ids.split(seq_len) if w.numel() >= 2]
    nll, count = 0.0, 0
    try:
        for group in _batches(windows, batch):
            x = torch.stack(group).to(device)  # [B, S]
            pos = torch.arange(x.shape[1], device=device).expand_as(x)  # [B, S]
            logits = model(x, pos, kv_len=x.shape[1])  # [B, S, V]
            nll += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
            count += x[:, 1:].numel()
    finally:
        for hook in hooks:
            hook.remove()
    topk_ids = torch.stack([torch.cat([i for i, _ in layer]) for layer in captured], dim=1)  # [N, L, K]
    topk_weights = torch.stack([torch.cat([w for _, w in layer]) for layer in captured], dim=1)
    counts = torch.stack([torch.bincount(topk_ids[:, i].flatten(), minlength=model.args.num_experts)
                          for i in range(topk_ids.shape[1])])  # [L, E]
    assert torch.equal(counts, model.expert_load().cpu()), "hooked routing disagrees with the model's counters"
    return nll, count, topk_ids.numpy(), topk_weights.numpy()


def _recorder(store: list, top_k: int):
    """A forward hook on a router: its logits [B*S, E] -> the same routing MoEBlock computes."""
    def hook(_module, _inputs, logits):
        routing = route(logits, top_k)
        store.append((routing.topk_ids.cpu(), routing.topk_weights.float().cpu()))
    return hook


def _batches(windows: list[torch.Tensor], batch: int):
    """Consecutive windows, batch at a time, split where the length changes: token order is kept."""
    group: list[torch.Tensor] = []
    for w in windows:
        if group and (len(group) == batch or w.numel() != group[0].numel()):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def layer_stats(ids: np.ndarray, num_experts: int) -> dict:
    """Load, skew, co-activation and consecutive-token reuse of one layer's topk_ids [N, K]."""
    n, k = ids.shape
    counts = np.bincount(ids.ravel(), minlength=num_experts)  # [E]
    mean = counts.sum() / num_experts
    coact = np.zeros((num_experts, num_experts), dtype=np.int64)  # [E, E], symmetric, zero diagonal
    for a, b in combinations(range(k), 2):
        np.add.at(coact, (ids[:, a], ids[:, b]), 1)
        np.add.at(coact, (ids[:, b], ids[:, a]), 1)
    pairs = sorted(((int(coact[i, j]), i, j) for i, j in combinations(range(num_experts), 2)), reverse=True)
    uniform_pair_share = 1 / math.comb(num_experts, 2) if k == 2 else None
    prev, cur = np.sort(ids[:-1], axis=1), np.sort(ids[1:], axis=1)
    overlap = (cur[:, :, None] == prev[:, None, :]).any(-1).sum(1) / k  # [N-1] share of slots reused
    return {
        "expert_slots": counts.tolist(), "share": [round(float(c / counts.sum()), 4) for c in counts],
        "busiest_expert": int(counts.argmax()), "busiest_over_mean": round(float(counts.max() / mean), 3),
        "least_over_mean": round(float(counts.min() / mean), 3),
        "coactivation": coact.tolist(),
        "top_pairs": [{"experts": [i, j], "tokens": c, "share": round(c / n, 4),
                       "over_uniform": round(c / n / uniform_pair_share, 2) if uniform_pair_share else None}
                      for c, i, j in pairs[:3]],
        "reuse_previous_token": round(float(overlap.mean()), 4),
    }


def _write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiny_moe.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "tiny_moe.md").write_text(_markdown(report))
    plotted = _plot(report, out / "tiny_moe.png")
    print(_markdown(report))
    print(f"wrote {out / 'tiny_moe.json'}, {out / 'tiny_moe.md'}" + (f", {plotted}" if plotted else
          " (no matplotlib: no plot)") + f"; trace {report['trace']['path']} ({report['trace']['bytes']} bytes)")


def _markdown(r: dict) -> str:
    met = "met" if r["skew_target_met"] else "NOT met"
    lines = [
        f"# Demo MoE on held-out stdlib text ({r['model']})", "",
        f"Our runtime ({r['device']}, {r['dtype']}): held-out loss {r['heldout_loss']:.4f} nats/token, "
        f"perplexity **{r['heldout_ppl']:.3f}** over {r['scored_tokens']} scored tokens "
        f"(windows of {r['seq_len']}; training.json reports {r['training_heldout_ppl']}).", "",
        f"Skew target (busiest expert >= {SKEW_TARGET:g}x the mean in some layer): **{met}** "
        f"(max {r['busiest_over_mean_max']:.2f}x). E={r['num_experts']}, top-{r['top_k']}.", "",
        "| layer | busiest expert | busiest / mean | least / mean | top pair (share of tokens, x uniform) "
        "| slots reused from previous token |",
        "|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(r["layers"]):
        p = s["top_pairs"][0] if s["top_pairs"] else None
        pair = f"{p['experts'][0]}+{p['experts'][1]} ({p['share']:.3f}, {p['over_uniform']}x)" if p else "-"
        lines.append(f"| {i} | {s['busiest_expert']} | {s['busiest_over_mean']:.2f} | "
                     f"{s['least_over_mean']:.2f} | {pair} | {s['reuse_previous_token']:.3f} |")
    lines += ["", f"Routing trace: `{r['trace']['path']}` ({r['trace']['tokens']} tokens in text order, "
              f"{r['trace']['bytes']} bytes; teacher-forced prefill of held-out windows, which is the "
              "order a model decoding this text would route).", ""]
    return "\n".join(lines)


def _plot(r: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layers, e = r["layers"], r["num_experts"]
    fig, axes = plt.subplots(2, len(layers), figsize=(3.2 * len(layers), 6.4), squeeze=False)
    for i, s in enumerate(layers):
        ax = axes[0][i]
        ax.bar(range(e), s["share"], color="tab:blue")
        ax.axhline(1 / e, color="gray", linestyle="--", linewidth=1, label="mean")
        ax.axhline(SKEW_TARGET / e, color="tab:red", linestyle=":", linewidth=1, label=f"{SKEW_TARGET:g}x mean")
        ax.set_title(f"layer {i}: busiest {s['busiest_over_mean']:.2f}x mean", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("share of token-slots" if i == 0 else "")
        heat = np.asarray(s["coactivation"], dtype=float)
        im = axes[1][i].imshow(heat / max(heat.sum() / 2, 1), cmap="viridis")
        axes[1][i].set_title("co-activation (share of tokens)", fontsize=9)
        axes[1][i].set_xlabel("expert")
        fig.colorbar(im, ax=axes[1][i], fraction=0.046)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{r['model']}: held-out ppl {r['heldout_ppl']:.2f} (our runtime, {r['dtype']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
