"""Static (fairseq capacity) gating under expert parallelism over 1-3 gloo processes on loopback: the same
output as experts_static on each rank's shard with the capacity of the padded shard size, the same drops,
load counted per primary slot, and a served generation equal to one process's when nothing drops."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_runtime.config import ExpertBufferingConfig, GatingConfig, ServingConfig
from moe_runtime.errors import ConfigError
from moe_runtime.experts import experts_static
from moe_runtime.gating import route
from moe_runtime.generate import SamplingParams, generate
from moe_runtime.model import ModelArgs
from moe_runtime.parallel import ExpertParallel, Lockstep, ParallelConfig, init_group
from moe_runtime.placement import round_robin
from moe_runtime.scheduler import Engine, Request
from moe_runtime.weights import init_random

pytestmark = pytest.mark.timeout(180)
PROMPTS = [[1, 2, 3, 4, 5], [60, 61], [7, 9, 11, 13, 15, 17, 19]]
TOKENS = (1, 13, 64)  # 1: empty shards on every rank but the first; 13: uneven shards


class ShardedStatic:
    """The single-process reference of fairseq's semantics, set as a MoEBlock's `parallel`: experts_static on
    each of W shards of ceil(T / W) tokens, with C = ceil(f * ceil(T / W)), no communication."""

    def __init__(self, world: int):
        self.world = world

    def forward(self, layer, moe, x):
        per = -(-x.shape[0] // self.world)
        outs = []
        for r in range(self.world):
            shard = x[r * per:(r + 1) * per]
            routing = route(moe.router(shard), moe.args.top_k, renormalize=moe.args.norm_topk_prob)
            out, dropped = experts_static(shard, moe.w13, moe.w2, routing.topk_weights, routing.topk_ids,
                                          moe.gating.capacity_fraction, capacity_tokens=per)
            moe.dropped_slots += dropped
            outs.append(out)
        return torch.cat(outs)


def _group(rank: int, world: int, store: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    init_group(ParallelConfig(rank, world, f"file://{store}"), timeout_s=120)


def _layer_worker(rank: int, world: int, store: str, out: str) -> None:
    """Every rank calls the MoE block on the same x (no Lockstep: no attention); rank 0 checks."""
    _group(rank, world, store)
    args = ModelArgs.from_name("tiny")
    result = []
    for f in (1.0, 0.25):
        model = init_random(args, seed=0, gating=GatingConfig("static", f))
        plain = init_random(args, seed=0, gating=GatingConfig("static", f))
        sharded = init_random(args, seed=0, gating=GatingConfig("static", f))
        sharded.layers[0].moe.parallel = ShardedStatic(world)
        per_rank = -(-args.num_experts // world)
        placements = {"round_robin": round_robin(args.num_layers, args.num_experts, world, per_rank),
                      "replicas": round_robin(args.num_layers, args.num_experts, world, per_rank + 1, version=1)}
        ep = ExpertParallel(model, placements["round_robin"], rank, world)
        for name, placement in placements.items():
            if placement.version:
                ep.apply(placement)
            before = ep.gather_slot_load()
            moe = model.layers[0].moe
            for t in TOKENS:
                x = torch.randn(t, args.hidden_size, generator=torch.Generator().manual_seed(t))
                dropped = int(model.dropped_slots())
                with torch.no_grad():
                    got = moe(x[None])[0]
                    want_sharded = sharded.layers[0].moe(x[None])[0]
                    want_plain = plain.layers[0].moe(x[None])[0]
                local = torch.tensor([int(model.dropped_slots()) - dropped])
                dist.all_reduce(local)
                result.append({"f": f, "placement": name, "tokens": t, "dropped": int(local),
                               "sharded_dropped": int(sharded.dropped_slots()),
                               "diff_sharded": float((got - want_sharded).abs().max()),
                               "diff_plain": float((got - want_plain).abs().max())})
                sharded.layers[0].moe.dropped_slots.zero_()
            routed = model.layers[0].moe.expert_load.clone()
            dist.all_reduce(routed)  # [E] token-slots routed over every shard, every placement so far
            load = (ep.gather_slot_load() - before)[:, 0].reshape(-1)  # [P] this placement's, layer 0
            primary = ep.primary[0]
            result[-1].update(slot_load=load.tolist(), primary=primary.tolist(), routed=routed.tolist())
            model.layers[0].moe.expert_load.zero_()
    dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_static_expert_parallel_equals_experts_static_on_each_ranks_padded_shard(tmp_path, world):
    out = tmp_path / "result.json"
    mp.spawn(_layer_worker, args=(world, str(tmp_path / "store"), str(out)), nprocs=world, join=True)
    rows = json.loads(out.read_text())
    args = ModelArgs.from_name("tiny")
    for row in rows:
        assert row["diff_sharded"] < 1e-5, row  # the per-rank capacity rule, drops included
        assert row["dropped"] == row["sharded_dropped"], row
        if row["f"] == 1.0:  # C >= the shard size: nothing drops, so it is experts_static on the whole batch
            assert row["dropped"] == 0 and row["diff_plain"] < 1e-5, row
        if world == 1:  # one rank: experts_static exactly, drops and all
            assert row["diff_plain"] < 1e-5, row
    assert any(r["dropped"] > 0 for r in rows if r["f"] == 0.25)
    if world > 1:  # capacity per rank, not per batch: the drops differ from experts_static on the whole batch
        assert any(r["diff_plain"] > 1e-3 for r in rows if r["f"] == 0.25)
    for row in (r for r in rows if "slot_load" in r):
        load, primary = row["slot_load"], row["primary"]
        # routed token-slots, kept or dropped, all on each expert's first slot; replicas idle
        assert [load[p] for p in primary] == row["routed"]
        assert sum(load) == sum(row["routed"]) == sum(TOKENS) * args.top_k


def _serve_worker(rank: int, world: int, store: str, out: str) -> None:
    _group(rank, world, store)
    args = ModelArgs.from_name("tiny")
    result = {}
    for f in (1.0, 0.25):
        model = init_random(args, seed=0, gating=GatingConfig("static", f))
        per_rank = -(-args.num_experts // world)
        ep = ExpertParallel(model, round_robin(args.num_layers, args.num_experts, world, per_rank), rank, world)
        lockstep = Lockstep(model, ep)
        if rank != 0:
            lockstep.follow()
            continue
        lockstep.lead()
        result[str(f)] = _lead(model, lockstep, args, world, f)
        lockstep.shutdown()
    dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)


def _lead(model, lockstep, args, world: int, f: float) -> dict:
    gating = GatingConfig("static", f)
    plain = init_random(args, seed=0, gating=gating)
    sharded = init_random(args, seed=0, gating=gating)
    for moe in sharded.moe_blocks:
        moe.parallel = ShardedStatic(world)
    tokens = torch.tensor([PROMPTS[2] * 8])  # 56 tokens: f 0.25 drops
    pos = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        got = model(tokens, pos, kv_len=tokens.shape[1])
        want_sharded = sharded(tokens, pos, kv_len=tokens.shape[1])
        want_plain = plain(tokens, pos, kv_len=tokens.shape[1])
    row = {"diff_sharded": float((got - want_sharded).abs().max()),
           "diff_plain": float((got - want_plain).abs().max()),
           "dropped": lockstep.gather_dropped(), "sharded_dropped": int(sharded.dropped_slots())}
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    row["expected"] = [c.output_ids for c in generate(plain, PROMPTS, params)]
    engine = Engine(model, ServingConfig(max_running_sequences=4))
    outputs, finished = {i: [] for i in range(len(PROMPTS))}, []
    for i, prompt in enumerate(PROMPTS):
        engine.submit(Request(prompt, params, lambda ev, i=i: (outputs[i].extend(ev.token_ids),
                                                                 ev.finish_reason and finished.append(i))))
    while len(finished) < len(PROMPTS):
        engine.step()
    row["got"] = [outputs[i] for i in range(len(PROMPTS))]
    return row


def test_static_gating_serves_through_lockstep_and_equals_one_process_when_nothing_drops(tmp_path):
    out = tmp_path / "result.json"
    mp.spawn(_serve_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    dropless, dropping = result["1.0"], result["0.25"]
    assert dropless["diff_plain"] < 1e-4 and dropless["dropped"] == 0
    assert dropless["got"] == dropless["expected"]
    assert dropping["diff_sharded"] < 1e-4  # drops on each rank's shard, as fairseq's workers do
    assert dropping["dropped"] == dropping["sharded_dropped"] > 0


def test_static_gating_with_expert_buffering_under_expert_parallelism_is_refused():
    args = ModelArgs.from_name("tiny")
    model = init_random(args, seed=0, gating=GatingConfig("static", 0.5))
    with pytest.raises(ConfigError, match="static gating"):
        ExpertParallel(model, round_robin(args.num_layers, args.num_experts, 1), 0, 1,
                       buffering=ExpertBufferingConfig(enabled=True, slots_per_layer=4))
    assert model.layers[0].moe.w13.numel() > 0  # refused before the experts left the model
