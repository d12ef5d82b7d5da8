"""An expert-parallel group of real `moe-runtime serve` processes (gloo, loopback), as pods run it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from moe_runtime.api.v1 import expert_control_pb2 as ec
from moe_runtime.api.v1 import expert_control_pb2_grpc as ec_grpc
from moe_runtime.api.v1 import generation_pb2 as gen
from moe_runtime.api.v1 import generation_pb2_grpc as gen_grpc
from moe_runtime.generate import SamplingParams, generate
from moe_runtime.placement import Placement
from moe_runtime.weights import load_model

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_group(size: int, flags: tuple[str, ...] = ()) -> list[tuple[subprocess.Popen, dict]]:
    leader = f"127.0.0.1:{_free_port()}"
    procs = []
    for rank in range(size):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "runtime"), "GLOO_SOCKET_IFNAME": "lo",
               "MOE_GROUP_SIZE": str(size), "MOE_LEADER_ADDRESS": leader, "POD_NAME": f"demo-g0-{rank}"}
        cmd = [sys.executable, "-m", "moe_runtime", "serve", "--model", "tiny", "--host", "127.0.0.1",
               "--grpc-port", "0", "--metrics-port", "0", "--admin-port", "0", "--max-tokens-limit", "300", *flags]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return [(p, json.loads(p.stdout.readline() or "{}")) for p in procs]


def _stop(group) -> None:
    for proc, _ in group:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc, _ in group:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _generate_through_a_replacement(info: dict, prompt: list[int]):
    """Stream 60 tokens from the leader while every expert changes rank: (tokens, the ApplyPlacement
    response, the placement applied, the expert load afterwards)."""
    with grpc.insecure_channel(f"127.0.0.1:{info['grpc_port']}") as ch, \
            grpc.insecure_channel(f"127.0.0.1:{info['admin_port']}") as admin:
        stub = ec_grpc.ExpertControlStub(admin)
        before = stub.GetPlacement(ec.GetPlacementRequest())
        req = gen.GenerateRequest(prompt_ids=gen.TokenIds(ids=prompt), max_tokens=60, ignore_eos=True)
        stream = gen_grpc.GenerationStub(ch).Generate(req)
        tokens = list(next(stream).token_ids)
        layers = [list(reversed(layer.experts)) for layer in before.layers]  # every expert changes rank
        moved = Placement(before.version + 1, before.num_ranks, before.slots_per_rank, tuple(map(tuple, layers)))
        applied = {}
        t = threading.Thread(target=lambda: applied.update(
            r=stub.ApplyPlacement(ec.ApplyPlacementRequest(placement=moved.to_proto()))))
        t.start()
        tokens += [tok for m in stream for tok in m.token_ids]
        t.join(timeout=60)
        return tokens, applied["r"], moved, stub.GetExpertLoad(ec.GetExpertLoadRequest())


def test_group_serves_the_single_process_tokens_through_a_live_replacement():
    group = _start_group(2)
    try:
        (_, info), (_, follower_info) = group
        assert info["event"] == "serving" and follower_info["event"] == "following"
        prompt = [5, 6, 7, 8]
        expected = generate(load_model("tiny"), [prompt], SamplingParams(max_new_tokens=60, ignore_eos=True))
        tokens, applied, moved, load = _generate_through_a_replacement(info, prompt)
        assert tokens == expected[0].output_ids
        assert applied.version == moved.version and applied.copied_bytes > 0
        per_rank = [int(np.sum(r.slot_counts)) for r in load.ranks]
        assert load.num_ranks == 2 and all(n > 0 for n in per_rank)
    finally:
        _stop(group)


def test_a_buffered_group_serves_the_same_tokens_and_exports_the_leaders_cache_counters():
    group = _start_group(2, ("--expert-buffering-slots", "2", "--expert-buffering-policy", "lru"))
    try:
        (_, info), (_, follower_info) = group
        assert info["event"] == "serving" and follower_info["event"] == "following"
        prompt = [5, 6, 7, 8]
        expected = generate(load_model("tiny"), [prompt], SamplingParams(max_new_tokens=60, ignore_eos=True))
        tokens, applied, moved, _ = _generate_through_a_replacement(info, prompt)
        assert tokens == expected[0].output_ids
        assert applied.version == moved.version and applied.copied_bytes == 0  # new experts load on demand
        text = urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics").read().decode()
        misses = [line for line in text.splitlines() if line.startswith("moe_runtime_expert_cache_misses_total ")]
        assert misses and float(misses[0].split()[1]) > 0
    finally:
        _stop(group)


def test_a_lost_rank_brings_the_group_down_nonzero():
    group = _start_group(2)
    try:
        (leader, _), (follower, _) = group
        follower.kill()
        assert leader.wait(timeout=60) != 0  # the idle heartbeat notices the lost peer
    finally:
        _stop(group)
