"""routing_policy.py on the demo model: adaptive top-p and trace-driven expert pruning (issue 9), config, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_runtime.config import RoutingConfig, RuntimeConfig
from moe_runtime.errors import ConfigError
from moe_runtime.routing_policy import apply_routing_policy, kept_experts
from moe_runtime.tokenizer import load_tokenizer
from moe_runtime.traces import Trace, load_trace
from moe_runtime.weights import load_checkpoint

# N tokens, L layers, E experts, K top-k

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "tiny-stdlib-moe"
TRACE = DEMO / "traces" / "heldout.npz"


@pytest.fixture(scope="module")
def demo():
    model = load_checkpoint(DEMO)
    model.setup_cache(1, 256)
    return model


@pytest.fixture(scope="module")
def heldout_ids(demo) -> torch.Tensor:
    """256 held-out tokens from beyond the trace's first 8192 (pruning is checked out of sample)."""
    tokenizer = load_tokenizer(DEMO, demo.args.vocab_size)
    ids = tokenizer.encode((DEMO / "heldout.txt").read_text()[60_000:80_000])
    return torch.tensor([ids[:256]])


def _run(model, ids: torch.Tensor, config: RoutingConfig):
    """(logits [1, N, V], expert load [L, E]) of one forward under `config`; the model is left plain."""
    apply_routing_policy(model, config)
    model.reset_counters()
    try:
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1])[None], kv_len=ids.shape[1])
        return logits, model.expert_load().clone()
    finally:
        apply_routing_policy(model, RoutingConfig())


def _router_probs_and_load(model, ids: torch.Tensor, config: RoutingConfig):
    """Each layer's router softmax [N, E] in a forward under `config` (hooks on the routers), and the load."""
    probs: list[torch.Tensor] = []
    hooks = [moe.router.register_forward_hook(lambda _m, _i, out: probs.append(torch.softmax(out.float(), -1)))
             for moe in model.moe_blocks]
    try:
        _, load = _run(model, ids, config)
    finally:
        for hook in hooks:
            hook.remove()
    return probs, load


def test_pruning_to_every_expert_equals_the_model(demo, heldout_ids):
    plain, plain_load = _run(demo, heldout_ids, RoutingConfig())
    pruned, pruned_load = _run(demo, heldout_ids, RoutingConfig(prune_keep=8, prune_trace=str(TRACE)))
    assert torch.equal(pruned, plain) and torch.equal(pruned_load, plain_load)


def test_pruning_routes_only_among_the_experts_the_trace_uses_most(demo, heldout_ids):
    trace = load_trace(TRACE)
    counts = np.stack([np.bincount(trace.topk_ids[:, layer].ravel(), minlength=8) for layer in range(4)])  # [L, E]
    want_kept = np.sort(np.argsort(-counts, axis=1, kind="stable")[:, :4], axis=1)  # [L, 4]
    _, plain_load = _run(demo, heldout_ids, RoutingConfig())
    _, load = _run(demo, heldout_ids, RoutingConfig(prune_keep=4, prune_trace=str(TRACE)))
    for layer in range(4):
        used = np.flatnonzero(load[layer].numpy())
        assert set(used) <= set(want_kept[layer]), (layer, used, want_kept[layer])
        assert int(load[layer].sum()) == int(plain_load[layer].sum()) == 2 * 256  # still top-2 everywhere
    assert bool((plain_load.numpy()[~kept_experts(trace, 4, 4, 8)] > 0).any())  # pruning changed the routing


def test_pruning_report_counts_the_pruned_experts_bytes(demo):
    report = apply_routing_policy(demo, RoutingConfig(prune_keep=6, prune_trace=str(TRACE)))
    apply_routing_policy(demo, RoutingConfig())
    one = 3 * 256 * 256 * 4  # w1, w3, w2 of H=F=256 in float32
    assert report.pruned_bytes == 2 * 4 * one and report.expert_bytes == 8 * 4 * one
    assert [len(kept) for kept in report.to_dict()["kept"]] == [6, 6, 6, 6]


def test_adaptive_top_p_of_one_equals_the_model(demo, heldout_ids):
    plain, plain_load = _run(demo, heldout_ids, RoutingConfig())
    adaptive, load = _run(demo, heldout_ids, RoutingConfig(adaptive_top_p=1.0))
    assert torch.equal(adaptive, plain) and torch.equal(load, plain_load)


@pytest.mark.parametrize("top_p", [0.5, 0.8])
def test_adaptive_top_p_uses_the_experts_the_router_probabilities_predict(demo, heldout_ids, top_p):
    # The adaptive run's own router outputs: its hidden states differ from the plain run's after layer 0.
    probs, load = _router_probs_and_load(demo, heldout_ids, RoutingConfig(adaptive_top_p=top_p))
    for layer, layer_probs in enumerate(probs):
        top = torch.topk(layer_probs, 2, dim=-1)  # [N, 2]
        alone = top.values[:, 0] >= top_p  # [N] tokens whose top expert alone reaches the threshold
        want = torch.zeros(8, dtype=torch.int64)
        want.index_add_(0, top.indices[:, 0], torch.ones(256, dtype=torch.int64))
        want.index_add_(0, top.indices[~alone, 1], torch.ones(int((~alone).sum()), dtype=torch.int64))
        assert torch.equal(load[layer], want), layer
    assert int(load.sum()) < 2 * 256 * 4  # the threshold saved expert slots


def test_kept_experts_refuses_a_trace_of_another_model():
    trace = Trace(np.zeros((4, 3, 2), dtype=np.int64), None, 8)
    with pytest.raises(ConfigError, match="3 layers"):
        kept_experts(trace, 4, num_layers=4, num_experts=8)


@pytest.mark.parametrize(("fields", "message"), [
    ({"prune_keep": 4}, "go together"),
    ({"prune_trace": "t.npz"}, "go together"),
    ({"prune_keep": 0, "prune_trace": "t.npz"}, ">= 1"),
    ({"adaptive_top_p": 0.0}, r"\(0, 1\]"),
    ({"unknown": 1}, "unknown config field routing.unknown"),
])
def test_bad_routing_config_is_rejected(fields, message):
    with pytest.raises(ConfigError, match=message):
        RuntimeConfig.from_dict({"routing": fields})


def test_routing_config_reads_from_the_runtime_config():
    config = RuntimeConfig.from_dict({"routing": {"adaptive_top_p": 0.9, "prune_keep": 6, "prune_trace": str(TRACE)}})
    assert config.routing == RoutingConfig(0.9, 6, str(TRACE)) and config.routing.enabled
    assert not RuntimeConfig().routing.enabled


def test_pruning_below_top_k_is_rejected(demo):
    with pytest.raises(ConfigError, match="below top_k"):
        apply_routing_policy(demo, RoutingConfig(prune_keep=1, prune_trace=str(TRACE)))


def test_cli_generate_with_adaptive_routing_and_pruning_reports_the_pruning():
    proc = subprocess.run(
        [sys.executable, "-m", "moe_runtime", "generate", "--model", str(DEMO), "--prompt", "import os\n",
         "--max-new-tokens", "8", "--adaptive-top-p", "0.8", "--prune-experts", "6", "--prune-trace", str(TRACE),
         "--contrast-alpha", "0.5", "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "runtime"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["output_ids"]) == 8 or out["finish_reason"] == "stop"
    assert out["pruning"]["pruned_bytes"] == 2 * 4 * 3 * 256 * 256 * 4


def test_buffered_pruned_model_holds_only_the_kept_experts_on_the_device(demo, heldout_ids):
    from moe_runtime.config import ExpertBufferingConfig
    from moe_runtime.expert_cache import enable_expert_buffering

    config = RoutingConfig(prune_keep=4, prune_trace=str(TRACE))
    want, _ = _run(demo, heldout_ids, config)
    buffered = load_checkpoint(DEMO)
    buffered.setup_cache(1, 256)
    apply_routing_policy(buffered, config)  # before buffering, so the prefetch predictor skips pruned experts
    enable_expert_buffering(buffered, ExpertBufferingConfig(enabled=True, slots_per_layer=4, prefetch=True))
    with torch.no_grad():
        got = buffered(heldout_ids, torch.arange(256)[None], kv_len=256)
    stats = buffered.expert_cache_stats()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert stats.evictions == [0, 0, 0, 0]  # four slots per layer hold the four kept experts for good
