"""CUDA-graph decode (cuda_graphs.py) against eager decode, in bf16 on CUDA.

bf16 rounding differs between a graph and eager (attended length, batch padding, kernel choice), so
greedy tokens may part ways at a near tie of the top-2 logits. The tests feed both paths the same tokens
and compare logits at every step, and compare free-running tokens except after such a near tie.
"""

import pytest
import torch

from moe_runtime.config import ServingConfig
from moe_runtime.cuda_graphs import batch_buckets, decode_graphs
from moe_runtime.generate import SamplingParams, decode, generate, next_tokens, prefill
from moe_runtime.model import ModelArgs
from moe_runtime.scheduler import Engine, Request
from moe_runtime.weights import init_random

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# B batch, V vocab

SIZES = {
    "tiny": ModelArgs.from_name("tiny").with_(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2, max_seq_len=1024),
    "medium": ModelArgs.from_name("tiny").with_(
        vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_layers=4, num_heads=16, num_kv_heads=4,
        max_seq_len=1024),
}
LOGITS_REL_TOL = 2e-2  # ||graph - eager|| / ||eager|| per step, bf16
TIE = 0.05  # a greedy choice may flip where the top-2 margin is under TIE x the logits' std


def _hopper() -> bool:
    return torch.cuda.get_device_capability() >= (9, 0)


def _model(size: str, max_batch: int = 32, max_seq: int = 512):
    model = init_random(SIZES[size], seed=0, device="cuda", dtype=torch.bfloat16)
    model.setup_cache(max_batch, max_seq)
    return model


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(length),), generator=gen).tolist()
            for length in torch.randint(3, 40, (n,), generator=gen)]


def _greedy_run(model, prompts, slots, steps: int, cuda_graphs: bool, forced=None):
    """Prefill each prompt into its cache row, then decode `steps` tokens together, greedy (or feeding
    forced [steps+1, B]). Returns the ids [steps+1, B] and float32 logits [steps+1, B, V] on the host."""
    logits = torch.stack([prefill(model, p, s) for p, s in zip(prompts, slots)]).float()  # [B, V]
    all_logits, all_ids = [logits], [logits.argmax(-1)]
    positions = [len(p) for p in prompts]  # where the first generated token goes
    batch = len(prompts)
    for t in range(steps):
        tokens = all_ids[-1] if forced is None else forced[t].to(logits.device)
        out = decode(model, tokens, positions, slots, cuda_graphs=cuda_graphs)
        assert out.static == cuda_graphs, "the graph path declined this step"
        all_logits.append(out.logits.float().clone())
        all_ids.append(next_tokens(out, [0.0] * batch, [1.0] * batch, [None] * batch).clone())
        positions = [p + 1 for p in positions]
    return torch.stack(all_ids).cpu(), torch.stack(all_logits).cpu()


def _assert_logits_close(got, want):
    for t in range(want.shape[0]):
        rel = ((got[t] - want[t]).norm() / want[t].norm()).item()
        assert rel < LOGITS_REL_TOL, f"step {t}: relative error of the logits {rel:.2e}"


def _assert_same_tokens(got, want, want_logits):
    """Equal token for token; a row may part ways only where want's top-2 margin was a near tie."""
    top2 = want_logits.topk(2, dim=-1).values  # [steps, B, 2]
    margin = top2[..., 0] - top2[..., 1]
    tie = TIE * want_logits.std().item()
    for row in range(want.shape[1]):
        differ = (got[:, row] != want[:, row]).nonzero()
        if len(differ):
            t = int(differ[0])
            assert margin[t, row] < tie, f"row {row} differs at step {t} with a top-2 margin {margin[t, row]:.3g}"


def _graph_vs_eager(model, prompts, slots, steps=24):
    eager_ids, eager_logits = _greedy_run(model, prompts, slots, steps, cuda_graphs=False)
    _, forced_logits = _greedy_run(model, prompts, slots, steps, cuda_graphs=True, forced=eager_ids)
    _assert_logits_close(forced_logits, eager_logits)
    graph_ids, _ = _greedy_run(model, prompts, slots, steps, cuda_graphs=True)
    _assert_same_tokens(graph_ids, eager_ids, eager_logits)
    assert not decode_graphs(model).declined


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_graph_decode_equals_eager_decode(size, batch):
    if batch * SIZES[size].top_k > 16 and not _hopper():
        pytest.skip("the dynamic expert path is sync-free (capturable) on SM90+ bf16 only")
    model = _model(size)
    _graph_vs_eager(model, _prompts(batch, model.args.vocab_size), list(range(batch)))


@pytest.mark.parametrize("slots", [[0, 1, 2], [5, 2, 9], [3, 0, 1, 7, 6]])
def test_padded_batches_in_any_cache_rows_equal_eager(slots):
    model = _model("tiny", max_batch=16)
    _graph_vs_eager(model, _prompts(len(slots), model.args.vocab_size, seed=1), slots)


@pytest.mark.skipif(torch.cuda.is_available() and not _hopper(), reason="larger buckets need SM90+ bf16")
@pytest.mark.parametrize("batch", [3, 5, 13, 20])
def test_every_batch_bucket_gives_each_sequence_its_batch_of_one_tokens(batch):
    model = _model("tiny", max_batch=32)
    prompts = _prompts(batch, model.args.vocab_size, seed=2)
    together, _ = _greedy_run(model, prompts, list(range(batch)), 16, cuda_graphs=True)
    for row, prompt in enumerate(prompts):
        alone, alone_logits = _greedy_run(model, [prompt], [0], 16, cuda_graphs=True)
        _assert_same_tokens(together[:, row:row + 1], alone, alone_logits)
    assert {key[0] for key in decode_graphs(model).graphs} == {1, next(b for b in batch_buckets(32) if b >= batch)}


def test_padded_rows_write_only_the_last_cache_position_and_are_not_counted():
    model = _model("tiny", max_batch=16, max_seq=300)
    prompts = _prompts(4, model.args.vocab_size, seed=3)
    prefill(model, prompts[3], 12)  # a bystander: a sequence in cache row 12 that is not decoding
    caches = [(layer.attention.kv_cache.k.clone(), layer.attention.kv_cache.v.clone()) for layer in model.layers]
    model.reset_counters()
    steps = 10
    _greedy_run(model, prompts[:3], [5, 2, 9], steps, cuda_graphs=True)  # 3 rows padded to 4
    _greedy_run(model, prompts[:3], [0, 1, 2], steps, cuda_graphs=True)  # rows 0..2, padding in row 3
    for layer, (k, v) in zip(model.layers, caches):
        for before, after in ((k, layer.attention.kv_cache.k), (v, layer.attention.kv_cache.v)):
            torch.testing.assert_close(after[12, :-1], before[12, :-1], rtol=0, atol=0)  # the bystander
            torch.testing.assert_close(after[3, :-1], before[3, :-1], rtol=0, atol=0)  # the padding row
    # Prefill counts every prompt token; decode counts 3 real rows per step, never the padding.
    tokens = 2 * (sum(len(p) for p in prompts[:3]) + 3 * steps)
    load = model.expert_load()
    assert load.min() >= 0
    assert load.sum(dim=1).tolist() == [tokens * model.args.top_k] * model.args.num_layers


def test_generate_with_graphs_samples_reproducibly_and_decodes_greedy_through_graphs():
    model = _model("tiny")
    prompts = _prompts(4, model.args.vocab_size, seed=4)
    sampled = SamplingParams(max_new_tokens=20, temperature=0.8, seed=7, ignore_eos=True)
    first = [c.output_ids for c in generate(model, prompts, sampled)]
    assert first == [c.output_ids for c in generate(model, prompts, sampled)]
    greedy = SamplingParams(max_new_tokens=20, ignore_eos=True)
    with_graphs = generate(model, prompts, greedy)
    assert decode_graphs(model).graphs, "generate() did not decode through a graph"
    assert all(len(c.output_ids) == 20 for c in with_graphs)


def test_engine_decodes_through_graphs_as_generate_does():
    model = _model("tiny", max_batch=8)
    prompts = _prompts(3, model.args.vocab_size, seed=5)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    want = [c.output_ids for c in generate(model, prompts, params)]
    engine = Engine(model, ServingConfig(max_running_sequences=8, max_seq_len=512))
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    requests = [engine.submit(Request(p, params, lambda ev, i=i: got[i].extend(ev.token_ids)))
                for i, p in enumerate(prompts)]  # queued before the loop starts: admitted in one step
    engine.start()
    try:
        assert engine.wait_idle(timeout=120)
    finally:
        engine.shutdown()
    assert all(r._stop_reason == "length" for r in requests)
    assert decode_graphs(model).graphs, "the engine did not decode through a graph"
    assert [got[i] for i in range(len(prompts))] == want


def test_graphs_are_not_used_under_an_expert_parallel_step_hook():
    model = _model("tiny")
    model.step_hook = lambda *args: None
    assert decode_graphs(model) is None
    out = decode(model, [1, 2], [3, 4], [0, 1])
    assert not out.static


def test_graphs_captured_at_warm_up_serve_every_batch_without_new_captures():
    """capture_graphs() covers every batch bucket, rows in order or not, padded or not: an engine
    serving requests that end at different times (rows reused out of order) captures nothing more.
    (Token equality with generate() is test_engine_decodes_through_graphs_as_generate_does's: in
    bfloat16 other batch shapes may round near-ties the other way.)"""
    model = _model("tiny", max_batch=8)
    prompts = _prompts(6, model.args.vocab_size, seed=6)
    lengths = [3, 9, 5, 12, 7, 10]
    engine = Engine(model, ServingConfig(max_running_sequences=4, max_seq_len=128))
    engine.start()
    try:
        captured = engine.capture_graphs()
        assert captured == len(decode_graphs(model).graphs) > 0
        got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            engine.submit(Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True),
                                  lambda ev, i=i: got[i].extend(ev.token_ids)))
        assert engine.wait_idle(timeout=120)
    finally:
        engine.shutdown()
    assert len(decode_graphs(model).graphs) == captured
    assert [len(got[i]) for i in range(len(prompts))] == lengths
