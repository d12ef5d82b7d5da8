"""`moe-runtime`: argparse -> config -> generate() / serve() / cache-sim / plan.

The only place that reads the command line; everything below receives built config objects.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_runtime.errors import ConfigError, RuntimeErrorBase

DTYPES = ("float32", "bfloat16", "float16")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="checkpoint directory or preset (tiny, mixtral-8x7b, ...)")
    p.add_argument("--gating", choices=("dynamic", "static"), default="dynamic")
    p.add_argument("--capacity-fraction", type=float, default=1.0,
                   help="static gating: per-expert capacity = ceil(f * tokens)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--seed-weights", type=int, default=0, help="random-init seed for presets")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (prefill + decode)")
    _add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (through the checkpoint's tokenizer.json, or bytes)")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--adaptive-top-p", type=float, metavar="P",
                   help="per token, the fewest top-k experts whose router mass reaches P (AdaMoE spirit)")
    p.add_argument("--prune-experts", type=int, metavar="N", help="route among the N experts per layer "
                   "that --prune-trace uses most (DeepSpeed multitask MoE pruning)")
    p.add_argument("--prune-trace", metavar="FILE", help="routing trace (.npz) that ranks experts for pruning")
    p.add_argument("--contrast-alpha", type=float, default=0.0, metavar="A",
                   help="SCMoE self-contrast strength against a rank-2-expert routing (0 = off)")
    _add_buffering_arguments(p)
    p.add_argument("--no-prefetch", action="store_true", help="expert buffering without layer-ahead prefetch")
    p.add_argument("--record-trace", metavar="FILE", help="write the routing trace (.npz) here at the end")
    p.set_defaults(func=_cmd_generate)


def _add_buffering_arguments(p: argparse.ArgumentParser) -> None:
    """Expert buffering flags shared by generate and serve (issue 5); a slot count or budget enables it."""
    from moe_runtime.config import BUFFERING_POLICIES

    p.add_argument("--expert-buffering-slots", type=int, metavar="N", help="device expert slots per MoE layer")
    p.add_argument("--expert-buffering-gpu-memory-bytes", type=int, metavar="BYTES",
                   help="device expert memory for all layers, split evenly (instead of --expert-buffering-slots)")
    p.add_argument("--expert-buffering-policy", choices=BUFFERING_POLICIES, help="eviction policy (default lifo)")


def _buffering_overrides(args: argparse.Namespace) -> dict:
    """The expert_buffering fields the flags set; a slot count or a budget turns buffering on."""
    out = {"slots_per_layer": args.expert_buffering_slots,
           "gpu_memory_bytes": args.expert_buffering_gpu_memory_bytes, "policy": args.expert_buffering_policy}
    out = {k: v for k, v in out.items() if v is not None}
    if "slots_per_layer" in out or "gpu_memory_bytes" in out:
        out = {"slots_per_layer": None, "gpu_memory_bytes": None, "enabled": True} | out
    return out


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise SystemExit(f"--prompt-ids: expected comma-separated integers ({exc})") from exc


def _generate_model(args: argparse.Namespace):
    """(model, trace recorder or None, pruning report or None) for `generate`: routing options set,
    experts buffered and routing recorded as asked."""
    import torch

    from moe_runtime.config import ExpertBufferingConfig, GatingConfig, RoutingConfig
    from moe_runtime.expert_cache import enable_expert_buffering
    from moe_runtime.routing_policy import apply_routing_policy
    from moe_runtime.trace_recorder import TraceRecorder
    from moe_runtime.weights import load_model

    gating = GatingConfig(args.gating, args.capacity_fraction)
    routing = RoutingConfig(args.adaptive_top_p, args.prune_experts, args.prune_trace)
    if args.record_trace and (routing.adaptive_top_p or 1.0) < 1.0:
        raise ConfigError("--record-trace with --adaptive-top-p below 1 is not supported (dropped slots)")
    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype), gating=gating,
                       seed=args.seed_weights)
    pruning = apply_routing_policy(model, routing)  # issue 9: None unless pruned
    buffering = ExpertBufferingConfig(**({"prefetch": not args.no_prefetch} | _buffering_overrides(args)))
    enable_expert_buffering(model, buffering)
    return model, TraceRecorder(model) if args.record_trace else None, pruning


def _cmd_generate(args: argparse.Namespace) -> int:
    from moe_runtime.generate import SamplingParams, generate
    from moe_runtime.tokenizer import load_tokenizer

    model, recorder, pruning = _generate_model(args)
    ckpt = Path(args.model) if Path(args.model).is_dir() else None
    tokenizer = load_tokenizer(ckpt, model.args.vocab_size)
    if args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(f"{args.model}: no tokenizer.json; use --prompt-ids")
        prompt_ids = tokenizer.encode(args.prompt)
    else:
        prompt_ids = _parse_ids(args.prompt_ids)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, contrast_alpha=args.contrast_alpha)
    (completion,) = generate(model, [prompt_ids], params)
    if recorder is not None:
        recorder.save(args.record_trace)
    text = tokenizer.decode(completion.output_ids) if tokenizer is not None else None
    if args.json:
        out = {"prompt_ids": prompt_ids, "output_ids": completion.output_ids,
               "finish_reason": completion.finish_reason, "gating": args.gating,
               "dropped_slots": int(model.dropped_slots())}
        if text is not None:
            out["text"] = text
        if model.expert_buffering is not None:
            out["expert_cache"] = model.expert_cache_stats().to_dict()
        if pruning is not None:
            out["pruning"] = pruning.to_dict()
        print(json.dumps(out))
    else:
        print(text if text is not None else " ".join(map(str, completion.output_ids)))
    return 0


# Flags of `serve` that override RuntimeConfig fields: flag -> (section or None, field, type).
_SERVE_FLAGS = {
    "model": (None, "model", str), "model_name": (None, "model_name", str), "device": (None, "device", str),
    "dtype": (None, "dtype", str), "placement": (None, "placement_file", str),
    "record_trace": (None, "record_trace", str),
    "gating": ("gating", "mode", str), "capacity_fraction": ("gating", "capacity_fraction", float),
    "host": ("serving", "host", str), "grpc_port": ("serving", "grpc_port", int),
    "metrics_port": ("serving", "metrics_port", int), "admin_port": ("serving", "admin_port", int),
    "admin_bind_address": ("serving", "admin_bind_address", str),
    "max_running_sequences": ("serving", "max_running_sequences", int),
    "max_batch_tokens": ("serving", "max_batch_tokens", int), "max_queue": ("serving", "max_queue", int),
    "max_tokens_limit": ("serving", "max_tokens_limit", int), "max_seq_len": ("serving", "max_seq_len", int),
    "drain_grace_seconds": ("serving", "drain_grace_seconds", float),
    "adaptive_top_p": ("routing", "adaptive_top_p", float), "prune_experts": ("routing", "prune_keep", int),
    "prune_trace": ("routing", "prune_trace", str),
}


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over gRPC (OIP v2, Generation, ExpertControl)")
    p.add_argument("--config", help="RuntimeConfig YAML; flags below override its fields")
    for flag, (_, _, kind) in _SERVE_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), type=kind, default=None)
    _add_buffering_arguments(p)
    p.set_defaults(func=_cmd_serve)


def runtime_config(args: argparse.Namespace):
    """RuntimeConfig from --config, then every flag given on the command line on top."""
    from moe_runtime.config import RuntimeConfig

    data = {}
    if args.config:
        data = RuntimeConfig.from_yaml(args.config).to_dict()
    for flag, (section, field, _) in _SERVE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            (data.setdefault(section, {}) if section else data)[field] = value
    data.setdefault("expert_buffering", {}).update(_buffering_overrides(args))
    return RuntimeConfig.from_dict(data)


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from moe_runtime.parallel import ParallelConfig
    from moe_runtime.server import run_follower, run_until_signalled

    config = runtime_config(args)
    backend = "nccl" if config.device.startswith("cuda") else "gloo"
    try:  # the expert-parallel env contract the operator injects (MOE_GROUP_SIZE, ...)
        parallel = ParallelConfig.from_env(os.environ, backend)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    if parallel is not None and config.record_trace:
        raise ConfigError("record_trace is not supported with expert parallelism yet")
    if parallel is not None and not parallel.is_leader:
        return asyncio.run(run_follower(config, parallel))
    asyncio.run(run_until_signalled(config, parallel))
    return 0


def _add_offline_tools(sub) -> None:
    from moe_runtime.cache_sim import add_cache_sim_arguments, cache_sim_main
    from moe_runtime.placement import add_plan_arguments, plan_main

    sim = sub.add_parser("cache-sim", help="replay a routing trace through the expert-cache policies")
    add_cache_sim_arguments(sim)
    sim.set_defaults(func=cache_sim_main)
    plan = sub.add_parser("plan", help="plan an expert placement from a routing trace")
    add_plan_arguments(plan)
    plan.set_defaults(func=plan_main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_offline_tools(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RuntimeErrorBase as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
