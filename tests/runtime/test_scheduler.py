"""The engine (scheduler.py) stepped by hand: each step hands out the tokens of the launch before it, so
a request that ends has one more token in flight, which must be dropped, and its cache row reused."""

from __future__ import annotations

import pytest

from moe_runtime.config import ServingConfig
from moe_runtime.generate import SamplingParams, generate
from moe_runtime.model import ModelArgs
from moe_runtime.scheduler import Engine, Request, TokenEvent
from moe_runtime.weights import init_random

PROMPTS = [[1, 2, 3, 4, 5], [60, 61], [7, 9, 11, 13, 15, 17, 19], [100, 3], [42], [8, 8, 8, 8]]


@pytest.fixture(scope="module")
def model():
    return init_random(ModelArgs.from_name("tiny"), seed=0)


def _run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[TokenEvent]]:
    events: list[list[TokenEvent]] = [[] for _ in requests]
    for i, (prompt, params) in enumerate(requests):
        engine.submit(Request(prompt, params, events[i].append))
    for _ in range(200):
        if all(ev and ev[-1].finish_reason is not None for ev in events):
            break
        engine.step()
    return events


def _tokens(events: list[TokenEvent]) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


def test_requests_that_stop_early_reuse_rows_and_match_solo_runs(model):
    """More requests than cache rows; some end on a stop token mid-batch while a token of theirs is in
    flight. Each gets exactly its solo greedy tokens, up to and including the stop token."""
    solo = [generate(model, [p], SamplingParams(max_new_tokens=10, ignore_eos=True))[0].output_ids for p in PROMPTS]
    requests = []
    for i, (prompt, ids) in enumerate(zip(PROMPTS, solo)):
        stop = (ids[2 + i % 3],) if i % 2 == 0 else ()  # every other request stops after 3 to 5 tokens
        requests.append((prompt, SamplingParams(max_new_tokens=10, ignore_eos=True, stop_token_ids=stop)))
    events = _run(Engine(model, ServingConfig(max_running_sequences=3)), requests)
    for (_, params), ids, evs in zip(requests, solo, events):
        want = ids[: ids.index(params.stop_token_ids[0]) + 1] if params.stop_token_ids else ids
        assert _tokens(evs) == want
        assert evs[-1].finish_reason == ("stop" if params.stop_token_ids else "length")
        assert [ev.finish_reason for ev in evs[:-1]] == [None] * (len(evs) - 1)  # one finish, at the end


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    alone = _tokens(_run(Engine(model, ServingConfig(max_running_sequences=4)), [(PROMPTS[0], params)])[0])
    greedy = SamplingParams(max_new_tokens=5, ignore_eos=True)
    mixed = _run(Engine(model, ServingConfig(max_running_sequences=4)),
                 [(PROMPTS[1], greedy), (PROMPTS[0], params), (PROMPTS[2], greedy)])
    assert _tokens(mixed[1]) == alone


def test_a_request_cancelled_with_a_token_in_flight_ends_once(model):
    engine = Engine(model, ServingConfig(max_running_sequences=2))
    events: list[TokenEvent] = []
    request = engine.submit(Request(PROMPTS[0], SamplingParams(max_new_tokens=50, ignore_eos=True), events.append))
    for _ in range(3):
        engine.step()
    request.cancel()
    for _ in range(3):
        engine.step()
    assert [ev.finish_reason for ev in events].count("cancelled") == 1
    assert events[-1].finish_reason == "cancelled"
    assert engine.in_flight() == 0
    # The row is free again and a new request decodes correctly in it.
    want = generate(model, [PROMPTS[1]], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].output_ids
    after = _run(engine, [(PROMPTS[1], SamplingParams(max_new_tokens=6, ignore_eos=True))])[0]
    assert _tokens(after) == want
