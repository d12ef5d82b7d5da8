"""cuda_graphs.py's bookkeeping on CPU: buckets, padding, staging and load counters, with replay emulated.

A captured graph is emulated by re-running the captured step (with the hooks it was captured with)
into the captured output tensors, so bucketing, padded rows, row layouts and the counter correction are
checked in fp32 against eager decode without a GPU. test_decode_gpu.py runs the real graphs.
"""

import pytest
import torch

from moe_runtime import cuda_graphs
from moe_runtime.cuda_graphs import batch_buckets, decode_graphs
from moe_runtime.generate import SamplingParams, decode, generate, next_tokens, prefill
from moe_runtime.model import ModelArgs
from moe_runtime.weights import init_random

# B batch, V vocab


class _Replay:
    """Stands in for a CUDA graph: replay() re-runs the step, with the hooks it was captured with."""

    def __init__(self, model, step, outputs):
        self.model, self.step, self.outputs = model, step, outputs
        self.hooks = [list(moe._forward_pre_hooks.values()) for moe in model.moe_blocks]

    def replay(self):
        handles = [moe.register_forward_pre_hook(h) for moe, hs in zip(self.model.moe_blocks, self.hooks) for h in hs]
        try:
            fresh = self.step()
        finally:
            for handle in handles:
                handle.remove()
        for out, new in zip(self.outputs, fresh):
            out.copy_(new)


class _Event:
    def record(self):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def model(monkeypatch):
    model = init_random(ModelArgs.from_name("tiny"), seed=0)
    model.setup_cache(16, 300)

    def record(self, step):
        step()  # the warm-up
        logits, greedy_ids = (t.clone() for t in step())
        return cuda_graphs._Graph(_Replay(model, step, (logits, greedy_ids)), logits, greedy_ids)

    monkeypatch.setattr(cuda_graphs, "_capturable", lambda m: m.step_hook is None and m.max_batch > 0)
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "_warm_up_and_record", record)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    return model


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 384, (int(k),), generator=gen).tolist() for k in torch.randint(3, 40, (n,), generator=gen)]


def _greedy_run(model, prompts, slots, steps: int, cuda_graphs: bool):
    """Prefill into `slots`, then decode greedily; ids [steps+1, B] and float32 logits [steps+1, B, V]."""
    logits = torch.stack([prefill(model, p, s) for p, s in zip(prompts, slots)]).float()
    all_logits, all_ids = [logits], [logits.argmax(-1)]
    positions, batch = [len(p) for p in prompts], len(prompts)
    for _ in range(steps):
        out = decode(model, all_ids[-1], positions, slots, cuda_graphs=cuda_graphs)
        assert out.static == cuda_graphs
        all_logits.append(out.logits.float().clone())
        all_ids.append(next_tokens(out, [0.0] * batch, [1.0] * batch, [None] * batch).clone())
        positions = [p + 1 for p in positions]
    return torch.stack(all_ids), torch.stack(all_logits)


def test_batch_buckets_cover_every_batch_size_up_to_the_cache_rows():
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.parametrize("slots", [[0], [0, 1, 2, 3], [0, 1, 2], [5, 2, 9], [3, 0, 1, 7, 6]])
def test_padded_and_scattered_batches_decode_as_eager_and_count_only_real_tokens(model, slots):
    prompts = _prompts(len(slots))
    prefill(model, _prompts(1, seed=9)[0], 12)  # a bystander in cache row 12, not decoding
    bystander = [(layer.attention.kv_cache.k[12].clone(), layer.attention.kv_cache.v[12].clone())
                 for layer in model.layers]
    model.reset_counters()
    eager_ids, eager_logits = _greedy_run(model, prompts, slots, 12, cuda_graphs=False)
    eager_load = model.expert_load().clone()
    model.reset_counters()
    graph_ids, graph_logits = _greedy_run(model, prompts, slots, 12, cuda_graphs=True)
    torch.testing.assert_close(graph_logits, eager_logits)
    assert torch.equal(graph_ids, eager_ids)
    assert torch.equal(model.expert_load(), eager_load)  # padded rows took their counts back out
    for layer, (k, v) in zip(model.layers, bystander):
        assert torch.equal(layer.attention.kv_cache.k[12, :-1], k[:-1])
        assert torch.equal(layer.attention.kv_cache.v[12, :-1], v[:-1])
    padded = next(b for b in batch_buckets(16) if b >= len(slots))
    assert {key[0] for key in decode_graphs(model).graphs} == {padded}


def test_padding_never_writes_a_position_a_sequence_uses(model):
    prompts = _prompts(3, seed=1)
    before = [layer.attention.kv_cache.k[3].clone() for layer in model.layers]
    _greedy_run(model, prompts, [0, 1, 2], 8, cuda_graphs=True)  # padded to 4: the padding is row 3
    for layer, k in zip(model.layers, before):
        assert torch.equal(layer.attention.kv_cache.k[3, :-1], k[:-1])
        assert not torch.equal(layer.attention.kv_cache.k[3, -1], k[-1])  # it wrote position M-1


def test_a_step_at_the_last_cache_position_runs_eager_when_padded(model):
    prompt = _prompts(1)[0]
    for slot in range(3):
        prefill(model, prompt, slot)
    out = decode(model, [1, 2, 3], [299, 5, 6], [0, 1, 2])  # position M-1 is taken by a real row
    assert not out.static
    assert decode(model, [1, 2, 3, 4], [299, 5, 6, 7], [0, 1, 2, 3]).static  # no padding: a graph


def test_generate_and_sampling_through_graphs_match_eager(model):
    prompts = _prompts(5, seed=2)
    for params in (SamplingParams(max_new_tokens=12, ignore_eos=True),
                   SamplingParams(max_new_tokens=12, temperature=0.9, seed=3, ignore_eos=True)):
        eager = [c.output_ids for c in generate(model, prompts, params, cuda_graphs=False)]
        assert [c.output_ids for c in generate(model, prompts, params)] == eager


def test_graphs_are_rebuilt_when_the_cache_moves(model):
    _greedy_run(model, _prompts(2), [0, 1], 2, cuda_graphs=True)
    first = decode_graphs(model)
    assert decode_graphs(model) is first
    model.setup_cache(16, 300)
    assert decode_graphs(model) is not first


def test_no_graphs_under_an_expert_parallel_step_hook(model):
    model.step_hook = lambda *args: None
    assert decode_graphs(model) is None
