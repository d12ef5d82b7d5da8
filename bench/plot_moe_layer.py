"""Plot bench/results/moe_layer.json: ms per MoE layer vs tokens for every path, with the roofline.

Reads the JSON bench/moe_layer.py wrote (on the GPU) and writes moe_layer.png beside it. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(RESULTS / "moe_layer.json"))
    opts = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(opts.json).read_text())
    tokens = sorted(int(t) for t in data["roofline"])
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(tokens, [data["roofline"][str(t)]["ms"] for t in tokens], "k--", lw=2, label="roofline (measured rates)")
    for path, rows in data["results"].items():
        points = [(t, rows[str(t)]["ms"]) for t in tokens if rows.get(str(t), {}).get("status") == "ok"]
        if points:
            style = "-o" if path.startswith("ours dynamic") else "-."
            ax.plot(*zip(*points), style, label=path, lw=2 if path.startswith("ours dynamic") else 1)
    ax.set(xscale="log", yscale="log", xlabel="tokens per MoE layer call (T)", ylabel="ms per layer",
           title=f"MoE layer, Mixtral-8x7B shape, bf16, {data['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(opts.json).with_suffix(".png")
    fig.savefig(out, dpi=120)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
