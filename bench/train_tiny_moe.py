"""Train the demo MoE of issue 9: a small Mixtral (transformers' MixtralForCausalLM) on the stdlib's own source.

Owns the corpus split (held-out files picked by a hash of their path, the text written out as heldout.txt),
the byte-level BPE tokenizer, the time-budgeted training loop that keeps the best held-out state, and the
bf16 HF-style checkpoint directory, checked at the end against transformers and moe_runtime.weights.
`--smoke` runs a tiny config on a corpus slice on CPU to check the script end to end.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from moe_runtime.weights import load_checkpoint

# B batch, S sequence, V vocab

EOS = "<|endoftext|>"  # the only special token: id 0, also used as bos and pad
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages"}
FULL = {
    "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2,
    "max_position_embeddings": 512, "seq_len": 512, "batch": 64, "lr": 1.5e-3, "warmup_steps": 100,
    "eval_every": 100, "max_epochs": 16, "heldout_bytes": (300_000, 400_000), "max_files": None,
}
SMOKE = FULL | {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "seq_len": 128,
    "batch": 8, "lr": 3e-3, "warmup_steps": 5, "eval_every": 10, "heldout_bytes": (20_000, 40_000),
    "max_files": 120,
}
SIZE_LIMIT_BYTES = 32 * 2**20


def main() -> None:
    args = _parse_args()
    t0 = time.monotonic()
    recipe = (SMOKE if args.smoke else FULL) | {"router_aux_loss_coef": args.aux_coef, "seed": args.seed}
    recipe["max_epochs"] = args.max_epochs or recipe["max_epochs"]
    _seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = stdlib_files(recipe["max_files"])
    train_files, heldout_files = split_heldout(files, *recipe["heldout_bytes"])
    heldout_text = "".join(EOS + text for _, text in heldout_files)
    (out / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    tok = train_tokenizer([text for _, text in train_files], recipe["vocab_size"])
    tok.save(str(out / "tokenizer.json"))
    train_ids = encode_stream(tok, [text for _, text in train_files])
    heldout_ids = torch.tensor(tok.encode(heldout_text).ids, dtype=torch.long)
    corpus = _corpus_summary(train_files, heldout_files, train_ids, heldout_ids, heldout_text)
    print(f"[{_clock(t0)}] corpus {json.dumps(corpus)}", flush=True)
    model = MixtralForCausalLM(build_config(recipe, len(tok.get_vocab()))).to(device)
    model.set_experts_implementation(args.experts_impl)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{_clock(t0)}] model {n_params / 1e6:.2f}M parameters, ~{2 * n_params / 2**20:.1f} MiB in bf16, "
          f"device {_device_name(device)}", flush=True)
    deadline = t0 + args.minutes * 60 - args.reserve_s
    run = train(model, train_ids.to(device), heldout_ids, recipe, args.steps, deadline, t0)
    model.load_state_dict(run.pop("best_state"))
    saved = save_checkpoint(model, out)
    check = verify_checkpoint(out, heldout_ids, recipe, device)
    report = _training_report(recipe, corpus, run, check, saved, n_params, device, t0)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[{_clock(t0)}] wrote {out}: {saved['total_bytes'] / 2**20:.2f} MiB "
          f"(limit {SIZE_LIMIT_BYTES / 2**20:.0f} MiB), held-out ppl {report['heldout_ppl']:.3f}", flush=True)
    if saved["total_bytes"] > SIZE_LIMIT_BYTES:
        print("WARNING: checkpoint directory is over the size limit; shrink vocab or hidden size", flush=True)
    if not check["ok"]:
        sys.exit("round-trip check FAILED: see training.json 'roundtrip'")


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="models/tiny-stdlib-moe", help="checkpoint directory to write")
    p.add_argument("--minutes", type=float, default=4.0, help="wall-clock budget of the whole run")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (else the budget)")
    p.add_argument("--reserve-s", type=float, default=25.0, help="seconds of the budget kept for save+checks")
    p.add_argument("--max-epochs", type=float, default=None,
                   help="stop after this many passes over the train tokens (default 16; the cosine spans it)")
    p.add_argument("--aux-coef", type=float, default=0.001, help="router load-balancing loss coefficient")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experts-impl", default="eager",
                   help="transformers experts implementation; eager runs the expert GEMMs in bf16 under autocast "
                        "(grouped_mm would get the fp32 master weights)")
    p.add_argument("--smoke", action="store_true", help="tiny config, corpus slice, CPU-friendly")
    p.add_argument("--cpu", action="store_true", help="train on CPU even if CUDA is available")
    return p.parse_args()


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def stdlib_files(max_files: int | None) -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's *.py, tests, idlelib and site-packages excluded, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or not path.is_file():
            continue
        try:
            found.append((rel.as_posix(), path.read_bytes().decode("utf-8")))
        except (OSError, UnicodeDecodeError):
            continue  # a few odd files (deliberately mis-encoded) are not source worth learning
    found.sort()
    if not found:
        sys.exit(f"no stdlib sources found under {root}")
    return found[:max_files] if max_files else found


def _path_hash(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()


def split_heldout(files, target_bytes: int, max_bytes: int):
    """Held-out = files with the smallest path hashes until ~target_bytes (none pushing past max_bytes)."""
    heldout, total = set(), 0
    for rel, text in sorted(files, key=lambda f: _path_hash(f[0])):
        size = len(text.encode("utf-8"))
        if total >= target_bytes:
            break
        if total + size <= max_bytes:
            heldout.add(rel)
            total += size
    train = [f for f in files if f[0] not in heldout]
    return train, [f for f in files if f[0] in heldout]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenizer/decoder) with EOS as the only special token (id 0)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.token_to_id(EOS) == 0
    return tok


def encode_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream: EOS before each document, as heldout.txt is written."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.append(0)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def build_config(recipe: dict, vocab_size: int) -> MixtralConfig:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "max_position_embeddings")
    return MixtralConfig(
        vocab_size=vocab_size, **{k: recipe[k] for k in keys}, tie_word_embeddings=True,
        router_aux_loss_coef=recipe["router_aux_loss_coef"], rope_parameters={"rope_type": "default",
        "rope_theta": 10000.0}, bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False,
    )


def heldout_windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping windows of seq_len tokens from the start (the last, shorter one kept if >= 2)."""
    return [w for w in ids.split(seq_len) if w.numel() >= 2]


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, seq_len: int, batch: int, device) -> float:
    """Mean next-token loss (nats) over every predicted held-out token, bf16 autocast on CUDA."""
    model.eval()
    total, count = 0.0, 0
    windows = heldout_windows(ids, seq_len)
    for i in range(0, len(windows), batch):
        for group in _same_length(windows[i:i + batch]):
            x = torch.stack(group).to(device)  # [B, S]
            with _autocast(device):
                logits = model(input_ids=x).logits  # [B, S, V]
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            total, count = total + loss.item(), count + x[:, 1:].numel()
    model.train()
    return total / count


def _same_length(windows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        groups.setdefault(w.numel(), []).append(w)
    return list(groups.values())


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _lr(recipe: dict, step: int, progress: float) -> float:
    """Linear warmup over steps, then cosine to 10% of the peak over the run's progress (time or steps)."""
    peak = recipe["lr"]
    if step < recipe["warmup_steps"]:
        return peak * (step + 1) / recipe["warmup_steps"]
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _optimizer(model, recipe: dict, device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe["lr"], betas=(0.9, 0.95), fused=device.type == "cuda")


def _train_step(model, opt, stream, recipe, gen) -> tuple[float, float]:
    """One AdamW step on a batch of random seq_len windows of the train stream; returns (lm loss, aux loss)."""
    seq, b = recipe["seq_len"], recipe["batch"]
    starts = torch.randint(0, stream.numel() - seq, (b,), generator=gen)
    x = stream[starts.to(stream.device)[:, None] + torch.arange(seq, device=stream.device)]  # [B, S]
    with _autocast(stream.device):
        out = model(input_ids=x, labels=x, output_router_logits=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    aux = out.aux_loss.item()
    return out.loss.item() - recipe["router_aux_loss_coef"] * aux, aux


def train(model, stream, heldout_ids, recipe: dict, max_steps: int | None, deadline: float, t0: float) -> dict:
    """Train until the deadline, max_steps or max_epochs; evaluate every eval_every steps; keep the best state."""
    device = stream.device
    opt, gen = _optimizer(model, recipe, device), torch.Generator().manual_seed(recipe["seed"] + 1)
    start, step, window = time.monotonic(), 0, []
    best = {"loss": math.inf, "step": 0, "state": None}
    history = []
    while True:
        progress = max(step / max_steps if max_steps else 0.0, (time.monotonic() - start) / (deadline - start),
                       step * recipe["batch"] * recipe["seq_len"] / (recipe["max_epochs"] * stream.numel()))
        done = progress >= 1.0 and step > 0  # at least one step, so there is a state to keep
        if step and (done or step % recipe["eval_every"] == 0):
            point = _eval_point(model, heldout_ids, recipe, step, window, start, device)
            history.append(point)
            window = []
            if point["heldout_loss"] < best["loss"]:
                best = {"loss": point["heldout_loss"], "step": step, "train_loss": point["train_loss"],
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            print(f"[{_clock(t0)}] eval step {step}: train {point['train_loss']:.4f} held-out "
                  f"{point['heldout_loss']:.4f} (best {best['loss']:.4f} @ {best['step']})", flush=True)
        if done:
            break
        for group in opt.param_groups:
            group["lr"] = _lr(recipe, step, progress)
        window.append(_train_step(model, opt, stream, recipe, gen))
        step += 1
        if step % 100 == 0 or step == 1:
            lm, aux = window[-1]
            print(f"[{_clock(t0)}] step {step} progress {progress:.3f} lr {_lr(recipe, step, progress):.2e} "
                  f"lm {lm:.4f} aux {aux:.4f}", flush=True)
    return {"steps": step, "train_seconds": time.monotonic() - start, "history": history,
            "best_step": best["step"], "best_heldout_loss": best["loss"],
            "best_train_loss": best["train_loss"], "best_state": best["state"]}


def _eval_point(model, heldout_ids, recipe, step, window, start, device) -> dict:
    loss = evaluate(model, heldout_ids, recipe["seq_len"], recipe["batch"], device)
    train_loss = sum(lm for lm, _ in window) / max(len(window), 1)
    aux = sum(a for _, a in window) / max(len(window), 1)
    return {"step": step, "seconds": round(time.monotonic() - start, 1), "train_loss": round(train_loss, 4),
            "aux_loss": round(aux, 4), "heldout_loss": round(loss, 4)}


def save_checkpoint(model, out: Path) -> dict:
    """bf16 safetensors via save_pretrained, then check the classic Mixtral tensor names our loader reads."""
    from safetensors import safe_open

    model = model.to(torch.bfloat16)
    model.config.use_cache = True  # off only for training
    kwargs = {"safe_serialization": True} if "safe_serialization" in _params(model.save_pretrained) else {}
    model.save_pretrained(str(out), **kwargs)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "pad_token": EOS,
        "model_max_length": model.config.max_position_embeddings}, indent=2) + "\n")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    if not any(".block_sparse_moe.experts.0.w1.weight" in n for n in names):
        sys.exit(f"save_pretrained wrote non-classic expert names (e.g. {names[:3]}); moe_runtime cannot load them")
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return {"files": sizes, "total_bytes": sum(sizes.values())}


def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _dtype_kwarg() -> str:
    """transformers >= 4.56 names it `dtype`; older ones `torch_dtype`."""
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


@torch.no_grad()
def verify_checkpoint(out: Path, heldout_ids: torch.Tensor, recipe: dict, device) -> dict:
    """Reload with transformers and with moe_runtime (fp32 compute on CPU): logits on held-out text agree."""
    hf = MixtralForCausalLM.from_pretrained(str(out), **{_dtype_kwarg(): torch.float32}).eval()
    ours = load_checkpoint(out, device="cpu", dtype=torch.float32)
    x = heldout_ids[: min(256, recipe["seq_len"])][None]  # [1, S]
    ref = hf(input_ids=x).logits  # [1, S, V]
    got = ours(x, torch.arange(x.shape[1])[None])
    diff = (ref - got).abs().max().item()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    saved_loss = evaluate(hf.to(device), heldout_ids, recipe["seq_len"], recipe["batch"], device)
    check = {"tokens": x.shape[1], "max_abs_logit_diff_hf_vs_runtime": diff, "argmax_agreement": agree,
             "logit_scale": ref.abs().max().item(), "heldout_loss_saved_bf16": round(saved_loss, 4)}
    check["ok"] = diff <= 1e-3 * max(1.0, check["logit_scale"]) and agree >= 0.99
    print(f"round trip: {json.dumps(check)}", flush=True)
    return check


def _corpus_summary(train_files, heldout_files, train_ids, heldout_ids, heldout_text) -> dict:
    return {
        "source": f"Python {platform.python_version()} stdlib *.py (minus {', '.join(sorted(SKIP_DIRS))})",
        "train_files": len(train_files), "heldout_files": len(heldout_files),
        "train_bytes": sum(len(t.encode()) for _, t in train_files),
        "heldout_bytes": len(heldout_text.encode()), "train_tokens": train_ids.numel(),
        "heldout_tokens": heldout_ids.numel(),
        "heldout_sha256": hashlib.sha256(heldout_text.encode()).hexdigest(),
    }


def _training_report(recipe, corpus, run, check, saved, n_params, device, t0) -> dict:
    heldout_loss = check["heldout_loss_saved_bf16"]
    return {
        "recipe": recipe | {"heldout_bytes": list(recipe["heldout_bytes"]), "optimizer": "AdamW(0.9, 0.95) "
                            "wd 0.1 on matrices, clip 1.0", "schedule": "linear warmup, cosine to 10% over "
                            "the first to end of: time budget, --steps, max_epochs", "precision": "bf16 autocast, fp32 master weights",
                            "tokenizer": "byte-level BPE (tokenizers), <|endoftext|> = id 0 = bos/eos/pad"},
        "eval_protocol": {"text": "heldout.txt", "seq_len": recipe["seq_len"],
                          "windows": "non-overlapping from the start, last shorter one kept if >= 2 tokens"},
        "corpus": corpus, "parameters": n_params, "device": _device_name(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "steps": run["steps"], "train_seconds": round(run["train_seconds"], 1),
        "total_seconds": round(time.monotonic() - t0, 1), "tokens_seen": run["steps"] * recipe["batch"]
        * recipe["seq_len"], "best_step": run["best_step"], "train_loss": run["best_train_loss"],
        "heldout_loss_fp32_master": round(run["best_heldout_loss"], 4), "heldout_loss": heldout_loss,
        "heldout_ppl": round(math.exp(heldout_loss), 3), "history": run["history"], "roundtrip": check,
        "files": saved["files"], "total_bytes": saved["total_bytes"],
    }


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _clock(t0: float) -> str:
    return f"{time.monotonic() - t0:6.1f}s"


if __name__ == "__main__":
    main()
