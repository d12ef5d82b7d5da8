"""Expert-parallel code path overhead at W=1 (issue 6): the same MoE layer with and without parallel.py.

One Mixtral-8x7B-shaped MoE layer (H=4096, F=14336, E=8, top-2, bf16) timed through the plain dynamic path
and through ExpertParallel (a 1-rank NCCL group: token sharding, the two-step all_to_all with its host
sync, slot remapping, all_gather). Multi-GPU throughput (W=2, 4) is bench/ep_multi.py (issue 10).
Writes DIR/ep.json and DIR/ep.md. `--quick` runs a tiny shape on the CPU (gloo) to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

from moe_runtime.model import ModelArgs  # noqa: E402
from moe_runtime.parallel import ExpertParallel, ParallelConfig, init_group  # noqa: E402
from moe_runtime.placement import round_robin  # noqa: E402
from moe_runtime.weights import init_random  # noqa: E402

# T tokens, H hidden


def _time(fn, device: torch.device, reps: int) -> float:
    """Median ms of `fn()` over `reps` runs after warm-up (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return sorted(samples)[len(samples) // 2]


def run(quick: bool) -> dict:
    device = torch.device("cpu" if quick else "cuda")
    dtype = torch.float32 if quick else torch.bfloat16
    args = ModelArgs.from_name("tiny" if quick else "mixtral-8x7b").with_(num_layers=1, vocab_size=512)
    store = tempfile.mktemp(prefix="ep-bench-")
    init_group(ParallelConfig(0, 1, f"file://{store}", "gloo" if quick else "nccl"))
    model = init_random(args, device=device, dtype=dtype)
    moe = model.layers[0].moe
    tokens = [1, 8, 64] if quick else [1, 8, 64, 512, 4096]
    rows = []
    with torch.inference_mode():
        for t in tokens:
            x = torch.randn(t, args.hidden_size, device=device, dtype=dtype)
            moe.parallel = None
            plain = _time(lambda x=x: moe(x), device, 5 if quick else 50)
            rows.append({"tokens": t, "plain_ms": plain})
        ep = ExpertParallel(model, round_robin(1, args.num_experts, 1), 0, 1)
        for row in rows:
            x = torch.randn(row["tokens"], args.hidden_size, device=device, dtype=dtype)
            row["ep_ms"] = _time(lambda x=x: moe(x), device, 5 if quick else 50)
            row["overhead"] = row["ep_ms"] / row["plain_ms"]
    assert moe.parallel is ep
    dist.destroy_process_group()
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "shape": args.to_dict(), "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"# Expert-parallel code path at W=1 vs the plain path ({result['device']}, torch {result['torch']}, "
             f"{result['dtype']})", "", "| tokens | plain ms | EP (W=1) ms | EP / plain |", "|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['plain_ms']:.3f} | {r['ep_ms']:.3f} | {r['overhead']:.2f}x |"
              for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--quick", action="store_true", help="tiny shape on the CPU (checks the script)")
    opts = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    result = run(opts.quick)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ep.json").write_text(json.dumps(result, indent=2))
    (out / "ep.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
