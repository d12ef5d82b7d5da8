"""Where a step's device time goes (issue 8: the profile behind a missed target).

Owns one measurement: torch.profiler over the 4-layer Mixtral-8x7B-shaped model (random bf16 weights) of
bench/decode.py, for a 2048-token prefill and an eager decode step at batch 1 (a graph replay hides its
kernels from the profiler; the graph runs the same kernels), and reports CUDA kernel time grouped by
kernel name, with each group's share of the step. Writes OUT/profile_step.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_layer import _device_name, _versions

from moe_runtime.generate import decode, prefill
from moe_runtime.model import ModelArgs
from moe_runtime.weights import init_random

TOP = 15  # kernel groups listed per step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--prefill", type=int, default=2048)
    opts = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_step.py needs a CUDA device")
    dev = torch.device("cuda")
    model = init_random(ModelArgs.from_name("mixtral-8x7b").with_(num_layers=4), seed=0, device=dev,
                        dtype=torch.bfloat16)
    model.setup_cache(1, opts.prefill + 64)
    ids = torch.randint(0, model.args.vocab_size, (opts.prefill,), generator=torch.Generator().manual_seed(1))
    steps = {
        f"prefill {opts.prefill}": lambda: prefill(model, ids.tolist(), 0),
        "decode b1 (eager)": lambda: decode(model, [1], [opts.prefill], [0], cuda_graphs=False),
    }
    report = {"device": _device_name(dev), "versions": _versions(), "steps": {}}
    for name, step in steps.items():
        report["steps"][name] = _profile(step)
        print(name, f"{report['steps'][name]['device_ms']:.2f} ms of kernels", flush=True)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_step.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "profile_step.md").write_text(_markdown(report))
    print(_markdown(report))


@torch.inference_mode()
def _profile(step, reps: int = 5) -> dict:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            groups[event.name][0] += event.device_time_total / 1e3 / reps  # ms per step
            groups[event.name][1] += 1 / reps
    total = sum(ms for ms, _ in groups.values())
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return {"device_ms": total, "kernels": [{"name": name[:120], "ms": ms, "calls": round(calls), "share": ms / total}
                                            for name, (ms, calls) in rows[:TOP]]}


def _markdown(report: dict) -> str:
    lines = [f"CUDA kernel time per step by kernel, 4-layer Mixtral-8x7B shape (bf16) on {report['device']}; "
             f"torch {report['versions'].get('torch')}. `bench/profile_step.py`.", ""]
    for name, step in report["steps"].items():
        lines += [f"## {name}: {step['device_ms']:.2f} ms of kernels", "", "| kernel | ms | calls | share |",
                  "|---|---|---|---|"]
        lines += [f"| `{k['name']}` | {k['ms']:.3f} | {k['calls']} | {100 * k['share']:.1f}% |" for k in step["kernels"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
