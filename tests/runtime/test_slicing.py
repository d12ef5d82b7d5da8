"""Expert slicing (issue 9): every expert's FFN split across gloo ranks on loopback equals the unsliced model."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_runtime.experts import experts_reference
from moe_runtime.gating import route
from moe_runtime.generate import SamplingParams, generate
from moe_runtime.model import ModelArgs
from moe_runtime.parallel import ParallelConfig, init_group
from moe_runtime.slicing import ExpertSlicing, ffn_slice, slice_experts
from moe_runtime.weights import init_random

# T tokens, E experts, K top-k, H hidden, F ffn, W ranks

pytestmark = pytest.mark.timeout(180)
PROMPTS = [[1, 2, 3, 4, 5], [60, 61], [7, 9, 11, 13, 15, 17, 19]]


@pytest.mark.parametrize(("ffn", "world"), [(96, 2), (96, 3), (19, 4), (7, 7)])
def test_ffn_slices_tile_the_ffn_width(ffn, world):
    bounds = [ffn_slice(ffn, rank, world) for rank in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == ffn
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_sliced_partial_outputs_sum_to_the_unsliced_experts():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 32, generator=gen)  # [T, H]
    w13, w2 = torch.randn(4, 2 * 24, 32, generator=gen), torch.randn(4, 32, 24, generator=gen)  # E=4, F=24
    routing = route(torch.randn(9, 4, generator=gen), 2)
    want = experts_reference(x, w13, w2, routing.topk_weights, routing.topk_ids)
    parts = [experts_reference(x, *slice_experts(w13, w2, *ffn_slice(24, r, 3)), routing.topk_weights,
                               routing.topk_ids) for r in range(3)]
    torch.testing.assert_close(sum(parts), want, atol=1e-4, rtol=1e-5)


def _args(num_experts: int) -> ModelArgs:
    return ModelArgs.from_name("tiny").with_(num_experts=num_experts, top_k=min(2, num_experts))


def _worker(rank: int, world: int, num_experts: int, store: str, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.manual_seed(0)
    model = init_random(_args(num_experts), seed=0)
    init_group(ParallelConfig(rank, world, f"file://{store}"), timeout_s=120)
    full_bytes = sum(moe.w13.numel() + moe.w2.numel() for moe in model.moe_blocks)
    ExpertSlicing(model, rank, world)  # every rank runs the same steps below (SPMD)
    tokens = torch.tensor([PROMPTS[2]])
    pos = torch.arange(tokens.shape[1])[None]
    model.setup_cache(1, tokens.shape[1])
    with torch.no_grad():
        logits = model(tokens, pos, kv_len=tokens.shape[1])
    got = [c.output_ids for c in generate(model, PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True))]
    held = sum(moe.w13.numel() + moe.w2.numel() for moe in model.moe_blocks)
    dist.destroy_process_group()
    if rank == 0:
        reference = init_random(_args(num_experts), seed=0)
        reference.setup_cache(1, tokens.shape[1])
        with torch.no_grad():
            want_logits = reference(tokens, pos, kv_len=tokens.shape[1])
        want = [c.output_ids for c in generate(reference, PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True))]
        result = {"max_logit_diff": float((logits - want_logits).abs().max()), "got": got, "expected": want,
                  "held_fraction": held / full_bytes}
        with open(out, "w") as f:
            json.dump(result, f)


@pytest.mark.parametrize(("world", "num_experts"), [(2, 8), (3, 2)])  # (3, 2): more ranks than experts
def test_sliced_experts_match_the_unsliced_model(tmp_path, world, num_experts):
    out = tmp_path / "result.json"
    mp.spawn(_worker, args=(world, num_experts, str(tmp_path / "store"), str(out)), nprocs=world, join=True)
    result = json.loads(out.read_text())
    assert result["max_logit_diff"] < 1e-4
    assert result["got"] == result["expected"]
    assert abs(result["held_fraction"] - 1 / world) < 1e-9  # each rank keeps only its share of F
