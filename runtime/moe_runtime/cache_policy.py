"""Eviction policies for one layer's pool of expert slots (issue 5; paper section 4, "Expert Buffering").

Owns which experts are resident, the slot each one holds and which one to evict. The live GPU cache
(`expert_cache.py`) and the offline simulator (`cache_sim.py`) drive the same classes, so a replay of a
recorded trace reproduces the live hit/miss counters. Pure Python: must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np

# E experts, T steps (one step = one decode batch of one layer)

STREAMED = -1  # Load.slot of an expert run without being kept (Belady's bound only)
POLICIES = ("lifo", "lru", "lfu", "fifo", "belady")
ONLINE_POLICIES = ("lifo", "lru", "lfu", "fifo")  # belady needs the future: simulator only


def validate_slots(slots: int, top_k: int, num_experts: int) -> None:
    """Raise ValueError unless top_k <= slots <= num_experts (one token's experts must fit at once)."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    if slots < top_k:
        raise ValueError(
            f"expert buffering needs at least top_k={top_k} slots per layer (every expert a token is "
            f"routed to must be resident at once), got slots={slots}"
        )
    if slots > num_experts:
        raise ValueError(
            f"slots={slots} exceeds num_experts={num_experts}: a layer has no more experts to cache"
        )


class Load(NamedTuple):
    """Copy `expert` into `slot`; `evicted` is the expert that held it (None: the slot was free).

    Only Belady's bound uses slot STREAMED: the expert runs without displacing anyone (see Belady).
    """

    expert: int
    slot: int
    evicted: int | None


class StepPlan(NamedTuple):
    """What one step of one layer needs: the resident experts and the copies to issue, in order."""

    hits: tuple[tuple[int, int], ...]  # (expert, slot) of needed experts already resident
    loads: tuple[Load, ...]  # one per miss, in load order (increasing expert id but in Belady's waves)

    @property
    def misses(self) -> tuple[int, ...]:
        return tuple(load.expert for load in self.loads)


class EvictionPolicy:
    """A pool of `slots` expert slots for one layer; subclasses only rank the eviction candidates.

    Rule shared by the online policies: a victim is a resident expert the current step does not need.
    Only when every resident expert is needed (the step needs more than `slots` experts, possible with
    batching) does the step run in waves: a needed expert that has already run is evicted, so a Load
    whose `evicted` is in the step must wait for that expert's FFN before its copy overwrites the slot.
    """

    name = ""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"an expert pool needs at least one slot, got slots={slots}")
        self.slots = slots
        self.steps = 0  # steps accessed so far = index of the coming step
        self._slot_of: dict[int, int] = {}  # resident expert -> slot
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._inserted: dict[int, int] = {}  # resident expert -> load sequence number (FIFO, LIFO)
        self._last_use: dict[int, int] = {}  # expert -> clock of its last step or prefetch (LRU)
        self._uses: dict[int, int] = {}  # expert -> steps that needed it since the start (LFU)
        self._clock = 0  # ticks once per access and once per prefetch
        self._seq = 0
        # Counters since creation, for metrics: accesses = hits + misses (distinct experts per step).
        self.hits = self.misses = self.prefetch_loads = self.evictions = 0

    @property
    def resident(self) -> dict[int, int]:
        """A copy of the resident experts and their slots."""
        return dict(self._slot_of)

    def lookup(self, expert: int) -> int | None:
        """The slot holding `expert`, or None."""
        return self._slot_of.get(expert)

    def access(self, needed: Iterable[int]) -> StepPlan:
        """One step of this layer: `needed` is the union of the experts its tokens are routed to.

        Misses are loaded in increasing expert id (fairseq runs local experts in id order, which is
        what the paper's LIFO argument relies on).
        """
        step = sorted(set(needed))
        clock = self._clock = self._clock + 1
        slot_of, last_use, uses = self._slot_of, self._last_use, self._uses
        hits: list[tuple[int, int]] = []
        misses: list[int] = []
        for expert in step:
            slot = slot_of.get(expert)
            if slot is None:
                misses.append(expert)
            else:
                hits.append((expert, slot))
            last_use[expert] = clock
            uses[expert] = uses.get(expert, 0) + 1
        self.hits += len(hits)
        self.misses += len(misses)
        loads = self._load_misses(step, misses) if misses else ()
        self.steps += 1
        return StepPlan(tuple(hits), loads)

    def prefetch(self, predicted: Iterable[int]) -> tuple[Load, ...]:
        """Load predicted experts before the coming step; returns the copies to issue.

        Only the first `slots` distinct predictions count (pass them best first); they are loaded in
        increasing expert id, as misses are. A prefetch never evicts a predicted expert, but it can
        evict one the step turns out to need: the live cache does not know the real routing yet, so a
        wrong prediction costs a demand miss. Prefetching marks a loaded expert as recently used (LRU)
        but does not count as a use (LFU).
        """
        wanted = list(dict.fromkeys(predicted))[: self.slots]
        self._clock += 1
        # At most `slots` are protected, so a missing prediction always finds an unprotected victim.
        loads = [
            self._load(e, self._victim(wanted, self.steps)) for e in sorted(wanted) if e not in self._slot_of
        ]
        self.prefetch_loads += len(loads)
        return tuple(loads)

    def forget(self, expert: int) -> None:
        """Drop `expert` and its history: its id now names other weights (a re-placed slot under expert
        parallelism). Its slot, if it held one, is free for the next load; the counters stay."""
        slot = self._slot_of.pop(expert, None)
        if slot is not None:
            del self._inserted[expert]
            self._free.append(slot)
        self._last_use.pop(expert, None)
        self._uses.pop(expert, None)

    def _load_misses(self, step: list[int], misses: list[int]) -> tuple[Load, ...]:
        return tuple([self._load(expert, self._victim(step, self.steps + 1)) for expert in misses])

    def _victim(self, protected: list[int], future: int) -> int | None:
        """The expert to evict for one load, None while a slot is free."""
        if self._free:
            return None
        candidates = [e for e in self._slot_of if e not in protected] or list(self._slot_of)
        return self._choose_victim(candidates, future)

    def _load(self, expert: int, victim: int | None) -> Load:
        if victim is None:
            slot = self._free.pop()
        else:
            slot = self._slot_of.pop(victim)
            del self._inserted[victim]
            self.evictions += 1
        self._seq += 1
        self._slot_of[expert] = slot
        self._inserted[expert] = self._seq
        self._last_use[expert] = self._clock
        return Load(expert, slot, victim)

    def _choose_victim(self, candidates: list[int], future: int) -> int:
        """The expert to evict among `candidates` (resident and unprotected, in no particular order).

        `future` is the index of the first step whose needs are not served yet (only Belady uses it).
        """
        raise NotImplementedError


# Victim rankings run once per miss in the simulator: C-level keys (dict.__getitem__) where they can.


class Lifo(EvictionPolicy):
    """The paper's policy: inactive experts first (the shared rule), then last in, first out."""

    name = "lifo"

    def _choose_victim(self, candidates: list[int], future: int) -> int:
        return max(candidates, key=self._inserted.__getitem__)


class Fifo(EvictionPolicy):
    """First in, first out: the expert loaded longest ago, however often it was used since."""

    name = "fifo"

    def _choose_victim(self, candidates: list[int], future: int) -> int:
        return min(candidates, key=self._inserted.__getitem__)


class Lru(EvictionPolicy):
    """Least recently used; ties (experts of the same step) go to the lower expert id."""

    name = "lru"

    def _choose_victim(self, candidates: list[int], future: int) -> int:
        return min(sorted(candidates), key=self._last_use.__getitem__)  # min keeps the first of ties


class Lfu(EvictionPolicy):
    """Least frequently used, counting the steps that needed an expert since the start (not since it
    was loaded): an expert's popularity is a stable property of the router, and per-residency counts
    would make every newly loaded expert the next victim. Ties: least recently used, then lower id."""

    name = "lfu"

    def _choose_victim(self, candidates: list[int], future: int) -> int:
        uses, last_use = self._uses, self._last_use
        return min(candidates, key=lambda e: (uses.get(e, 0), last_use[e], e))


class Belady(EvictionPolicy):
    """Belady's MIN, the offline optimum: evict the expert whose next use is farthest (never first).

    `future` is every step's needed experts, in order; a step is one time point; ties go to the
    lower id. A step needing more than `slots` experts (waves) ends holding the `slots` experts,
    resident or needed, used soonest after it, its kept misses loaded last. If it keeps none of its
    misses, they are STREAMED: a real pool would have to keep the last one loaded. That relaxation
    (waves only) makes this a lower bound on every policy's misses, optimal where no step overflows
    the pool; the tests check both against brute force.
    """

    name = "belady"

    def __init__(self, slots: int, future: Sequence[Iterable[int]]) -> None:
        super().__init__(slots)
        self._next_use = next_use_table(future)  # [T + 1, E]

    def _soonest_first(self, future: int) -> Callable[[int], tuple[int, int]]:
        if future >= len(self._next_use):
            raise IndexError(f"belady was given the needs of {len(self._next_use) - 1} steps only")
        row = self._next_use[future].tolist()  # [E]
        never = len(self._next_use) - 1  # T: ids beyond the table never occur in the future
        return lambda e: (row[e] if e < len(row) else never, -e)

    def _choose_victim(self, candidates: list[int], future: int) -> int:
        return max(candidates, key=self._soonest_first(future))

    def _load_misses(self, step: list[int], misses: list[int]) -> tuple[Load, ...]:
        if len(step) <= self.slots:
            return super()._load_misses(step, misses)
        soonest = self._soonest_first(self.steps + 1)
        keep = sorted(self._slot_of.keys() | step, key=soonest)[: self.slots]
        if not set(keep) & set(misses):
            return tuple(Load(expert, STREAMED, None) for expert in misses)
        to_go = [e for e in self._slot_of if e not in keep]  # evicted first come, first out, once run
        loads = []
        for expert in [m for m in misses if m not in keep] + [m for m in misses if m in keep]:
            loads.append(self._load(expert, to_go.pop(0) if to_go else None))
            if expert not in keep:
                to_go.append(expert)
        assert self._slot_of.keys() == set(keep), (self._slot_of, keep)
        return tuple(loads)


def next_use_table(future: Sequence[Iterable[int]]) -> np.ndarray:
    """[T + 1, E]: the first step >= t needing expert e, T if none (the last row is all T)."""
    steps = [list(needed) for needed in future]
    t_steps = len(steps)
    step_of = np.repeat(np.arange(t_steps), [len(s) for s in steps])  # [sum of |needed|]
    experts = np.fromiter(chain.from_iterable(steps), dtype=np.int64, count=len(step_of))
    when = np.full((t_steps + 1, int(experts.max(initial=-1)) + 1), t_steps, dtype=np.int64)  # [T + 1, E]
    when[step_of, experts] = step_of
    return np.minimum.accumulate(when[::-1], axis=0)[::-1]


_ONLINE = {cls.name: cls for cls in (Lifo, Lru, Lfu, Fifo)}


def make_policy(name: str, slots: int, *, future: Sequence[Iterable[int]] | None = None) -> EvictionPolicy:
    """A fresh, empty pool. `future` (every step's needed experts) is required by, and only by, belady."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; expected one of: {', '.join(POLICIES)}")
    if name == "belady":
        if future is None:
            raise ValueError("belady is offline: it needs future= (every step's needed experts)")
        return Belady(slots, future)
    return _ONLINE[name](slots)
