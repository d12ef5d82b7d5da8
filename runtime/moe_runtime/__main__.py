"""`moe-runtime`: argparse -> config -> generate() / serve() / cache-sim / plan.

The only place that reads the command line; everything below receives built config objects.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_runtime.errors import RuntimeErrorBase

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
    p.set_defaults(func=_cmd_generate)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise SystemExit(f"--prompt-ids: expected comma-separated integers ({exc})") from exc


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from moe_runtime.config import GatingConfig
    from moe_runtime.generate import SamplingParams, generate
    from moe_runtime.tokenizer import load_tokenizer
    from moe_runtime.weights import load_model

    gating = GatingConfig(args.gating, args.capacity_fraction)
    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype), gating=gating,
                       seed=args.seed_weights)
    ckpt = Path(args.model) if Path(args.model).is_dir() else None
    tokenizer = load_tokenizer(ckpt, model.args.vocab_size)
    if args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(f"{args.model}: no tokenizer.json; use --prompt-ids")
        prompt_ids = tokenizer.encode(args.prompt)
    else:
        prompt_ids = _parse_ids(args.prompt_ids)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    (completion,) = generate(model, [prompt_ids], params)
    text = tokenizer.decode(completion.output_ids) if tokenizer is not None else None
    if args.json:
        out = {"prompt_ids": prompt_ids, "output_ids": completion.output_ids,
               "finish_reason": completion.finish_reason, "gating": args.gating,
               "dropped_slots": int(model.dropped_slots())}
        if text is not None:
            out["text"] = text
        print(json.dumps(out))
    else:
        print(text if text is not None else " ".join(map(str, completion.output_ids)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
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
