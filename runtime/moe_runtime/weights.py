"""Model weights: HF checkpoint directories (safetensors only) and random init for presets.

Owns the HF -> runtime tensor-name map of each family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) and the
gate/up fusion into w13. A missing, extra, mis-shaped or unreadable tensor fails at load with the file
and tensor named. Never unpickles anything.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from moe_runtime.config import GatingConfig
from moe_runtime.errors import CheckpointError, ConfigError
from moe_runtime.model import PRESETS, ModelArgs, Transformer

# E experts, H hidden, F expert ffn

_DENSE_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_RE = re.compile(r"(\w+)\.experts\.(\d+)\.(\w+)\.weight")
# An expert's projections: Mixtral's block_sparse_moe.experts.E.{w1,w3,w2}, the others' mlp.experts.E.*.
_MIXTRAL_PARTS = {"w1": "w1", "w3": "w3", "w2": "w2"}
_SWIGLU_PARTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_PROGRESS_BYTES = 1 << 30  # show a progress bar for loads above 1 GiB


@dataclass(frozen=True)
class _Target:
    """Where one checkpoint tensor goes: a runtime parameter, optionally one expert's slice of it."""

    param: str
    expert: int | None = None
    part: str | None = None  # "w1" | "w3" (a half of a w13) | "w2"


@functools.lru_cache(maxsize=16)
def _layer_names(args: ModelArgs) -> dict[str, tuple[str, str | None]]:
    """HF names inside model.layers.N (routed experts aside) -> (runtime name inside layers.N, part)."""
    moe = _moe_prefix(args)
    names: dict[str, tuple[str, str | None]] = {
        "input_layernorm.weight": ("attention_norm.weight", None),
        "post_attention_layernorm.weight": ("ffn_norm.weight", None),
        f"{moe}.gate.weight": ("moe.router.weight", None),
    }
    for proj, ours in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")):
        names[f"self_attn.{proj}_proj.weight"] = (f"attention.{ours}.weight", None)
        has_bias = args.o_bias if proj == "o" else args.qkv_bias
        if has_bias:
            names[f"self_attn.{proj}_proj.bias"] = (f"attention.{ours}.bias", None)
    if args.qk_norm:
        names |= {f"self_attn.{n}_norm.weight": (f"attention.{n}_norm.weight", None) for n in ("q", "k")}
    if args.shared_expert_intermediate_size:  # Qwen2-MoE: gate_proj/up_proj fused as the experts' w13
        shared = "moe.shared_expert"
        names |= {
            f"{moe}.shared_expert.gate_proj.weight": (f"{shared}.w13.weight", "w1"),
            f"{moe}.shared_expert.up_proj.weight": (f"{shared}.w13.weight", "w3"),
            f"{moe}.shared_expert.down_proj.weight": (f"{shared}.w2.weight", None),
            f"{moe}.shared_expert_gate.weight": (f"{shared}.gate.weight", None),
        }
    return names


def _moe_prefix(args: ModelArgs) -> str:
    return "block_sparse_moe" if args.model_type == "mixtral" else "mlp"


def _expert_parts(args: ModelArgs) -> dict[str, str]:
    """HF projection name of a routed expert -> its part of our w13 / w2."""
    return _MIXTRAL_PARTS if args.model_type == "mixtral" else _SWIGLU_PARTS


def _empty_model(args: ModelArgs, gating, device, dtype: torch.dtype) -> Transformer:
    """Allocate the model on `device` without initialising weights (meta first: no host copy)."""
    with torch.device("meta"):
        model = Transformer(args, gating)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.reset_counters()
    return model


def is_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir()


def read_config(directory: Path) -> ModelArgs:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint directory needs config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    try:
        return ModelArgs.from_hf_config(config)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _target(name: str, args: ModelArgs) -> _Target | None:
    if name in _DENSE_NAMES:
        if name == "lm_head.weight" and args.tie_word_embeddings:
            return None
        return _Target(_DENSE_NAMES[name])
    m = _LAYER_RE.fullmatch(name)
    if not m or int(m.group(1)) >= args.num_layers:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if rest in _layer_names(args):
        param, part = _layer_names(args)[rest]
        return _Target(f"layers.{layer}.{param}", None, part)
    e = _EXPERT_RE.fullmatch(rest)
    parts = _expert_parts(args)
    if e and e.group(1) == _moe_prefix(args) and int(e.group(2)) < args.num_experts and e.group(3) in parts:
        part = parts[e.group(3)]
        return _Target(f"layers.{layer}.moe.{'w2' if part == 'w2' else 'w13'}", int(e.group(2)), part)
    return None


def _destination(param: torch.Tensor, target: _Target) -> torch.Tensor:
    """The view of `param` one checkpoint tensor fills: an expert's row of w13/w2, and of a w13 the
    gate (w1) or up (w3) half: w13 = cat(w1, w3) along the output dimension, as HF's fused gate_up_proj."""
    dest = param if target.expert is None else param[target.expert]
    if target.part in ("w1", "w3"):
        half = dest.shape[0] // 2
        dest = dest[:half] if target.part == "w1" else dest[half:]
    return dest


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: unreadable index ({exc})") from exc
        return [directory / f for f in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise CheckpointError(f"{directory}: only pickle weights (*.bin/*.pt) found; safetensors required")
        raise CheckpointError(f"{directory}: no *.safetensors files")
    return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the index but missing")
        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from exc
        with handle as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError, RuntimeError) as exc:
                    raise CheckpointError(f"{path}: tensor {name!r} unreadable ({exc})") from exc
                yield path, name, tensor


def _total_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files if p.is_file())


def load_checkpoint(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    gating: GatingConfig | None = None,
) -> Transformer:
    """Build the model of `directory/config.json` and fill it from its safetensors files."""
    directory = Path(directory)
    args = read_config(directory)
    files = _weight_files(directory)
    model = _empty_model(args, gating, device, dtype)
    params = dict(model.named_parameters())
    seen: set[tuple[str, int | None, str | None]] = set()
    bar = tqdm(total=_total_bytes(files), unit="B", unit_scale=True, desc="loading weights",
               disable=_total_bytes(files) < _PROGRESS_BYTES)
    for path, name, tensor in _iter_tensors(files):
        target = _target(name, args)
        if target is None:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} for a {args.num_layers}-layer, "
                                  f"{args.num_experts}-expert {args.model_type} config")
        _copy_into(params[target.param], target, tensor, path, name)
        seen.add((target.param, target.expert, target.part))
        bar.update(tensor.numel() * tensor.element_size())
    bar.close()
    _check_complete(seen, params, args, directory)
    model.setup_cache(1, min(args.max_seq_len, 2048))
    return model.eval()


def _copy_into(param, target: _Target, tensor, path: Path, name: str) -> None:
    with torch.no_grad():
        dest = _destination(param, target)
        if tensor.shape != dest.shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(tensor.shape)}, "
                                  f"expected {list(dest.shape)}")
        dest.copy_(tensor)


def _check_complete(seen, params, args: ModelArgs, directory: Path) -> None:
    required: set[tuple[str, int | None, str | None]] = set()
    for pname in params:
        if pname.endswith(".moe.w13"):
            required |= {(pname, e, p) for e in range(args.num_experts) for p in ("w1", "w3")}
        elif pname.endswith(".moe.w2"):
            required |= {(pname, e, "w2") for e in range(args.num_experts)}
        elif pname.endswith(".shared_expert.w13.weight"):
            required |= {(pname, None, "w1"), (pname, None, "w3")}
        elif not (pname == "output.weight" and args.tie_word_embeddings):
            required.add((pname, None, None))
    missing = sorted(required - seen, key=str)
    if missing:
        names = [_hf_name(*m, args) for m in missing[:5]]
        raise CheckpointError(f"{directory}: missing tensor(s) {', '.join(names)}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def _hf_name(param: str, expert: int | None, part: str | None, args: ModelArgs) -> str:
    """The checkpoint name that fills a runtime parameter (for error messages)."""
    inverse = {v: k for k, v in _DENSE_NAMES.items()}
    if param in inverse:
        return inverse[param]
    layer, rest = param.split(".", 2)[1], param.split(".", 2)[2]
    if expert is not None:
        hf_part = {v: k for k, v in _expert_parts(args).items()}[part]
        return f"model.layers.{layer}.{_moe_prefix(args)}.experts.{expert}.{hf_part}.weight"
    return f"model.layers.{layer}." + {v: k for k, v in _layer_names(args).items()}[(rest, part)]


def init_random(
    args: ModelArgs,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    gating: GatingConfig | None = None,
) -> Transformer:
    """A preset with random weights (std 0.02 linears, unit norms), deterministic for a seed and device."""
    model = _empty_model(args, gating, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:  # drawn on the target device: full-width presets would take minutes on the host
                p.normal_(0.0, 0.02, generator=gen)
    model.setup_cache(1, min(args.max_seq_len, 2048))
    return model.eval()


def load_model(
    source: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    gating: GatingConfig | None = None,
    seed: int = 0,
) -> Transformer:
    """A checkpoint directory or a preset name (random weights)."""
    if Path(source).is_dir():
        return load_checkpoint(source, device=device, dtype=dtype, gating=gating)
    if source in PRESETS:
        return init_random(PRESETS[source], seed=seed, device=device, dtype=dtype, gating=gating)
    raise CheckpointError(f"{source!r} is neither a checkpoint directory nor a preset "
                          f"({', '.join(sorted(PRESETS))})")
