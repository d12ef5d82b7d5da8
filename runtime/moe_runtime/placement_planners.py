"""Packing algorithms behind the planners of `moe_runtime.placement`: load arrays in, slot tables out.

Pure numpy on checked [L, E] loads; returns rank-major [L, W, S] tables. No Placement, no I/O, no torch:
`moe_runtime.placement` validates inputs, wraps the tables into versioned Placements and stays the only
import point. Algorithms: the paper's greedy and anti-correlation (section 5), our replicate_pack and the
unequal replica shares that even out what its equal splits leave.
"""

from __future__ import annotations

import numpy as np

# L layers, E experts, W ranks, S slots per rank, P = W*S physical slots (slot p on rank p // S)

ANTI_CORRELATION_WEIGHT = 0.5  # the paper's fixed coefficient on the Pearson correlation S[a, m]
# Loads are token-slot counts from a finite window: a count n is known to about sqrt(n) if tokens route
# independently (Poisson), and bursty routing (consecutive tokens sharing experts) inflates that. A change is
# taken only if it lowers a maximum by more than this many sqrt(n), so re-planning does not chase the noise
# of the window (and does not move expert weights for nothing).
MIN_GAIN_STANDARD_ERRORS = 2.0
DONORS = 4  # replica-count search: how many donor experts to try per receiver
# Water-filling sweeps over the replicated experts: the maximum settles within a few (the pieces keep
# drifting along directions that leave it unchanged), so stop once no piece moves by 1e-4 of a mean rank.
SHARE_SWEEPS, SHARE_TOLERANCE = 20, 1e-4
# Shares level each rank's load plus this many sqrt(its Poisson variance), not the load alone: a rank whose
# load is mostly a few unsplit experts is noisier in the next window, so it is left a little lighter.
SHARE_STANDARD_ERRORS = 2.0
SHARE_DECIMALS = 6  # shares are written rounded: readable JSON, balance exact to 1e-6 of an expert's load


def greedy_table(load: np.ndarray, num_ranks: int, slots_per_rank: int, seed: int) -> np.ndarray:
    """The paper's greedy (LPT with a cardinality cap); extra slots go to the hottest experts, one each."""
    prio = priority(load.shape, seed)
    counts = counts_hottest_first(expert_order(load, prio), num_ranks * slots_per_rank)
    slots, _ = pack(load, prio, counts, num_ranks, slots_per_rank)
    return canonical(slots)


def anti_correlation_table(
    load: np.ndarray, corr: np.ndarray, num_ranks: int, slots_per_rank: int, seed: int
) -> np.ndarray:
    """The paper's anti-correlation greedy: device n's load for candidate a is sum_m P[m,n](A_m + 0.5 S[a,m]).

    A_m is expert m's share of the layer's token-slots (sums to 1, as in the paper's 1/D objective), so the
    0.5 keeps the paper's scale whatever units the caller's load has.
    """
    total = load.sum(axis=1, keepdims=True)
    share = np.divide(load, total, out=np.full_like(load, 1.0 / load.shape[1]), where=total > 0)
    prio = priority(load.shape, seed)
    counts = counts_hottest_first(expert_order(share, prio), num_ranks * slots_per_rank)
    slots, _ = pack(share, prio, counts, num_ranks, slots_per_rank, corr=corr)
    return canonical(slots)


def replicate_pack_table(load: np.ndarray, num_ranks: int, slots_per_rank: int, seed: int) -> np.ndarray:
    """Replicate, pack, then change the plan only where that pays more than the noise of the load.

    It starts from DeepSeek EPLB's global plan exactly (largest-load-per-replica counts, LPT of the replicas,
    EPLB's tie order at seed 0) with any two replicas of one expert on one rank swapped apart. Each layer
    then keeps a change only if it lowers a maximum by more than MIN_GAIN_STANDARD_ERRORS * sqrt(load):
    swaps off the most loaded rank, greedy's hottest-first counts, and a local search on the counts.
    """
    prio = priority(load.shape, seed)
    num_slots = num_ranks * slots_per_rank
    counts = counts_by_load_per_replica(load, prio, num_slots, cap=num_ranks)
    state = packed(load, prio, counts, num_ranks, slots_per_rank)
    hottest = counts_hottest_first(expert_order(load, prio), num_slots)
    if not np.array_equal(hottest, counts):
        adopt_better(state, packed(load, prio, hottest, num_ranks, slots_per_rank), np.arange(load.shape[0]))
    refine_counts(load, prio, state, num_ranks)
    return canonical(state[1])


def replica_shares(load: np.ndarray, slots: np.ndarray) -> np.ndarray | None:
    """[L, W, S] fraction of its expert's load each slot takes, chosen to even out the rank loads; None when
    that is the equal split everywhere (no replicas, or nothing to gain). Shares move no weights.

    Water-filling, sweep after sweep: each replicated expert in turn pours its load over the ranks holding
    it up to one level, the rest of their loads held fixed, so no step raises the highest of those ranks.
    Without the noise margin (SHARE_STANDARD_ERRORS = 0) the sweeps converge to the most even rank loads
    the slot table allows: on such transportation problems min-max and least squares share their optimum.
    """
    num_layers, num_ranks = slots.shape[:2]
    table = slots.reshape(num_layers, -1)  # [L, P]
    counts = np.zeros(load.shape, dtype=np.int64)
    np.add.at(counts, (np.arange(num_layers)[:, None], table), 1)
    expert_load = np.take_along_axis(load, table, 1)  # [L, P] load of each slot's expert
    equal = 1.0 / np.take_along_axis(counts, table, 1)  # [L, P]
    piece = expert_load * equal  # [L, P] token-slots each slot takes, equal split to start
    replicated = counts > 1  # [L, E]
    order = np.argsort(~replicated, axis=1, kind="stable")[:, : replicated.sum(axis=1).max()]  # [L, J]
    experts = np.where(np.take_along_axis(replicated, order, 1), order, -1)  # [L, J], -1 pads
    tol = SHARE_TOLERANCE * float(load.sum(axis=1).max()) / num_ranks
    for _ in range(SHARE_SWEEPS if experts.size else 0):
        if max(pour(load, table, piece, expert_load, column, num_ranks) for column in experts.T) <= tol:
            break
    poured = np.zeros(load.shape)
    np.add.at(poured, (np.arange(num_layers)[:, None], table), piece)
    poured = np.take_along_axis(poured, table, 1)  # [L, P] the load each slot's expert was poured
    share = np.divide(piece, poured, out=equal.copy(), where=np.isfinite(poured) & (poured > 0))
    share = rounded(share, table, load.shape[1])
    return None if np.abs(share - equal).max() < 10.0**-SHARE_DECIMALS else share.reshape(slots.shape)


def pour(
    load: np.ndarray, table: np.ndarray, piece: np.ndarray, expert_load: np.ndarray, experts: np.ndarray,
    num_ranks: int,
) -> float:
    """One water-filling step, in place on piece [L, P] (expert_load [L, P] the load of each slot's expert):
    in each layer with experts[l] >= 0, that expert's load goes to the ranks holding it so that they end as
    level as possible (its slots on one rank share that rank's part equally). Returns the largest change."""
    layers = np.flatnonzero(experts >= 0)
    if layers.size == 0:
        return 0.0
    rows, expert = np.arange(layers.size), experts[layers]
    held = piece[layers]  # [A, P]
    mine = table[layers] == expert[:, None]  # [A, P]
    by_rank = (num_ranks, -1)
    count = mine.reshape(layers.size, *by_rank).sum(axis=2)  # [A, W] its slots on each rank
    base = (held * ~mine).reshape(layers.size, *by_rank).sum(axis=2)  # [A, W] the rest of each rank's load
    # a piece f * n of an expert with n token-slots varies as f^2 n = piece^2 / n (Poisson)
    variance = (held**2 / np.maximum(expert_load[layers], 1.0)).reshape(layers.size, *by_rank).sum(axis=2)
    base = np.where(count > 0, base + SHARE_STANDARD_ERRORS * np.sqrt(variance), np.inf)
    level_of = np.sort(base, axis=1)  # [A, W] ranks holding it first, lightest first
    filled = (load[layers, expert][:, None] + np.cumsum(np.where(np.isfinite(level_of), level_of, 0), 1))
    level = filled / np.arange(1, num_ranks + 1)  # [A, W] the level if the k lightest ranks share the load
    reaches = np.isfinite(level_of) & (level > level_of)
    k = np.where(reaches.any(axis=1), num_ranks - 1 - np.argmax(reaches[:, ::-1], axis=1), 0)
    part = np.where(count > 0, np.maximum(level[rows, k][:, None] - base, 0.0), 0.0)  # [A, W]
    rank = np.arange(table.shape[1]) // (table.shape[1] // num_ranks)
    new = np.where(mine, (part / np.maximum(count, 1))[:, rank], held)
    piece[layers] = new
    return float(np.abs(new - held).max())


def rounded(share: np.ndarray, table: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, P] shares rounded to SHARE_DECIMALS, each expert's largest share absorbing the rounding so that
    its replicas still sum to 1."""
    out = np.round(share, SHARE_DECIMALS)
    for layer, held in enumerate(table):
        total = np.bincount(held, weights=out[layer], minlength=num_experts)
        order = np.lexsort((-out[layer], held))  # by expert, its largest share first
        largest = order[np.r_[True, np.diff(held[order]) != 0]]
        out[layer, largest] = np.round(out[layer, largest] + 1.0 - total[held[largest]], SHARE_DECIMALS)
    return out


def packed(
    load: np.ndarray, prio: np.ndarray, counts: np.ndarray, num_ranks: int, slots_per_rank: int
) -> list[np.ndarray]:
    """[counts [L, E], slots [L, W, S], slot_load [L, W, S]] after packing and swaps."""
    slots, slot_load = pack(load, prio, counts, num_ranks, slots_per_rank)
    improve_by_swaps(slots, slot_load)
    return [counts, slots, slot_load]


def adopt_better(state: list[np.ndarray], trial: list[np.ndarray], layers: np.ndarray) -> np.ndarray:
    """Take `trial` (for `layers`) where its maximum rank load is lower by more than the noise; [A] bool."""
    top, new_top = state[2][layers].sum(axis=2).max(axis=1), trial[2].sum(axis=2).max(axis=1)
    better = new_top < top - np.maximum(MIN_GAIN_STANDARD_ERRORS * np.sqrt(top), 1e-9 * top)
    for current, candidate in zip(state, trial):
        current[layers[better]] = candidate[better]
    return better


def refine_counts(load: np.ndarray, prio: np.ndarray, state: list[np.ndarray], num_ranks: int) -> None:
    """Local search on the replica counts, in place: give an expert of the most loaded rank one more replica,
    taken from one of the DONORS experts whose load per replica grows least, re-pack, and keep the best
    trial while it lowers the maximum by more than the noise."""
    counts, slots, slot_load = state
    for _ in range(counts.shape[1]):
        rank_load = slot_load.sum(axis=2)  # [L, W]
        top, mean = rank_load.max(axis=1), rank_load.mean(axis=1)
        layers = np.flatnonzero(
            (top - mean > MIN_GAIN_STANDARD_ERRORS * np.sqrt(top)) & (counts > 1).any(axis=1)
        )
        if layers.size == 0:
            return
        rows, hot = np.arange(layers.size), rank_load[layers].argmax(axis=1)
        best = [a.copy() for a in (counts[layers], slots[layers], slot_load[layers])]
        for k, donor_rank in np.ndindex(slots.shape[2], DONORS):
            receiver = slots[layers, hot, k]  # [A]
            trial = counts[layers].copy()
            grown = np.where(trial > 1, load[layers] / np.maximum(trial - 1, 1), np.inf)
            grown[rows, receiver] = np.inf
            donor = np.argsort(grown, axis=1, kind="stable")[:, min(donor_rank, grown.shape[1] - 1)]
            movable = np.isfinite(grown[rows, donor]) & (trial[rows, receiver] < num_ranks)
            trial[rows, receiver] += movable
            trial[rows, donor] -= movable
            adopt_better(best, packed(load[layers], prio[layers], trial, num_ranks, slots.shape[2]), rows)
        if not adopt_better(state, best, layers).any():
            return


def canonical(slots: np.ndarray) -> np.ndarray:
    """[L, W, S] with each rank's experts ascending and the ranks in lexicographic order. Balance does not
    depend on which rank is which, so this only keeps re-plans from moving weights for nothing: the same
    groups of experts get the same ranks whatever the order of the loads."""
    slots = np.sort(slots, axis=2)
    for layer in range(slots.shape[0]):
        slots[layer] = slots[layer][np.lexsort(slots[layer].T[::-1])]
    return slots


def priority(shape: tuple[int, int], seed: int) -> np.ndarray:
    """[L, E] the experts in the order that breaks ties: by id for seed 0 (as EPLB), else a seeded shuffle."""
    prio = np.tile(np.arange(shape[1]), (shape[0], 1))
    return prio if seed == 0 else np.random.default_rng(seed).permuted(prio, axis=1)


def expert_order(load: np.ndarray, prio: np.ndarray) -> np.ndarray:
    """[L, E] experts by load, heaviest first, equal loads in `prio` order."""
    return np.take_along_axis(prio, np.argsort(-np.take_along_axis(load, prio, 1), axis=1, kind="stable"), 1)


def counts_hottest_first(order: np.ndarray, num_slots: int) -> np.ndarray:
    """[L, E] replica counts: one each, then the extra slots dealt to the experts in load order."""
    num_layers, num_experts = order.shape
    extra, rest = divmod(num_slots - num_experts, num_experts)
    ordered = np.full((num_layers, num_experts), 1 + extra, dtype=np.int64)
    ordered[:, :rest] += 1
    counts = np.empty_like(ordered)
    np.put_along_axis(counts, order, ordered, axis=1)
    return counts


def counts_by_load_per_replica(load: np.ndarray, prio: np.ndarray, num_slots: int, cap: int) -> np.ndarray:
    """[L, E] replica counts: each extra slot goes to the expert with the largest load / replicas.

    Greedy min-max of the per-replica load (DeepSeek EPLB's replicate rule). Counts stay <= `cap` (the
    number of ranks) while any expert is below it, so replicas can sit on distinct ranks.
    """
    num_layers, num_experts = load.shape
    ordered_load = np.take_along_axis(load, prio, axis=1)  # ties resolve to the earlier expert in prio
    ordered = np.ones((num_layers, num_experts), dtype=np.int64)
    rows = np.arange(num_layers)
    for _ in range(num_slots - num_experts):
        per_replica = ordered_load / ordered
        capped = np.where(ordered >= cap, -np.inf, per_replica)
        per_replica = np.where(np.isfinite(capped).any(axis=1, keepdims=True), capped, per_replica)
        ordered[rows, per_replica.argmax(axis=1)] += 1
    counts = np.empty_like(ordered)
    np.put_along_axis(counts, prio, ordered, axis=1)
    return counts


def replica_items(load: np.ndarray, prio: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replicas as packing items [L, P]: item_expert and item_load (= load / replicas), heaviest first.

    Equal loads keep EPLB's physical order: first replicas in `prio` order, then the extra replicas in the
    order the largest-load-per-replica rule creates them (the k-th replica of e when load_e / (k-1) is top).
    """
    experts, loads = [], []
    for layer in range(load.shape[0]):
        c, first = counts[layer], prio[layer]
        extra = np.repeat(np.arange(c.size), c - 1)  # expert of each extra replica
        start = np.repeat(np.cumsum(c - 1) - (c - 1), c - 1)
        kth = np.arange(extra.size) - start + 1  # 1 for an expert's 2nd replica, 2 for its 3rd...
        position = np.argsort(first)[extra]  # ties in creation order go to the earlier expert in prio
        expert = np.concatenate([first, extra[np.lexsort((position, -load[layer, extra] / kth))]])
        item_load = load[layer, expert] / c[expert]
        by_load = np.argsort(-item_load, kind="stable")
        experts.append(expert[by_load])
        loads.append(item_load[by_load])
    return np.stack(experts), np.stack(loads)


def pack(
    load: np.ndarray,
    prio: np.ndarray,
    counts: np.ndarray,
    num_ranks: int,
    slots_per_rank: int,
    corr: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """LPT with a cardinality cap, all layers at once: each item to the lightest rank with a free slot.

    With `corr` [L, E, E] the rank score gets the paper's anti-correlation term. Two replicas of one expert
    that land on one rank are then swapped apart, so they share a rank only when unavoidable (more replicas
    than ranks). Returns slots, slot_load [L, W, S].
    """
    item_expert, item_load = replica_items(load, prio, counts)
    num_layers, num_experts = load.shape
    rows = np.arange(num_layers)
    fill = np.zeros((num_layers, num_ranks), dtype=np.int64)
    rank_load = np.zeros((num_layers, num_ranks))
    slots = np.zeros((num_layers, num_ranks, slots_per_rank), dtype=np.int64)
    slot_load = np.zeros((num_layers, num_ranks, slots_per_rank))
    penalty = None if corr is None else np.zeros((num_layers, num_ranks, num_experts))
    for i in range(item_expert.shape[1]):
        e = item_expert[:, i]  # [L]
        score = rank_load if penalty is None else rank_load + ANTI_CORRELATION_WEIGHT * penalty[rows, :, e]
        r = np.where(fill < slots_per_rank, score, np.inf).argmin(axis=1)  # [L]; ties: lowest rank, as EPLB
        k = fill[rows, r]
        slots[rows, r, k] = e
        slot_load[rows, r, k] = item_load[:, i]
        fill[rows, r] += 1
        rank_load[rows, r] += item_load[:, i]
        if penalty is not None:
            penalty[rows, r, :] += corr[rows, :, e]  # penalty[l, n, a] = sum over m on n of S[l, a, m]
    duplicated = (np.diff(np.sort(slots, axis=2), axis=2) == 0).any(axis=(1, 2))  # [L]
    for layer in np.flatnonzero(duplicated):  # a second replica on one rank is swapped away where possible
        while any(swap_out_duplicate(slots[layer], slot_load[layer], rank) for rank in range(num_ranks)):
            pass
    return slots, slot_load


def swap_out_duplicate(table: np.ndarray, loads: np.ndarray, rank: int) -> bool:
    """Swap a second replica off `rank` ([W, S] tables edited in place) with an item of a rank that holds
    neither copy's expert, the swap raising the pair's maximum least. False if `rank` has none to fix.

    Each swap removes at least one duplicate, so repeating it terminates.
    """
    experts, counts = np.unique(table[rank], return_counts=True)
    rank_load = loads.sum(axis=1)  # [W]
    for x in experts[counts > 1]:
        ok = ~(table == x).any(axis=1, keepdims=True) & ~np.isin(table, table[rank])  # [W, S]
        if not ok.any():
            continue
        i = np.flatnonzero(table[rank] == x)[0]
        moved = loads[rank, i] - loads  # [W, S]
        new_max = np.maximum(rank_load[rank] - moved, rank_load[:, None] + moved)
        other, j = np.unravel_index(np.where(ok, new_max, np.inf).argmin(), table.shape)
        table[rank, i], table[other, j] = table[other, j], x
        loads[rank, i], loads[other, j] = loads[other, j], loads[rank, i]
        return True
    return False


def improve_by_swaps(slots: np.ndarray, slot_load: np.ndarray, max_rounds: int = 10_000) -> None:
    """Local search in place: swap one item of the most loaded rank with one of another rank.

    Per layer, the swap that lowers the pair's new maximum the most is taken while it beats the old maximum
    by more than the noise of the two swapped loads; it never puts an expert on a rank already holding it.
    Stops when no layer improves.
    """
    num_layers, num_ranks, _ = slots.shape
    holds = np.zeros((num_layers, num_ranks, int(slots.max()) + 1), dtype=np.int64)  # replicas per rank
    np.add.at(holds, (np.arange(num_layers)[:, None, None], np.arange(num_ranks)[None, :, None], slots), 1)
    active = np.arange(num_layers)
    for _ in range(max_rounds):
        if active.size == 0:
            return
        improved = swap_once(slots, slot_load, holds, active)
        active = active[improved]


def swap_once(slots: np.ndarray, slot_load: np.ndarray, holds: np.ndarray, active: np.ndarray) -> np.ndarray:
    """One best swap per active layer (slots, slot_load, holds edited in place); [A] bool improved."""
    sl, sx = slot_load[active], slots[active]  # [A, W, S]
    num_active, num_ranks, num_slots = sl.shape
    rows = np.arange(num_active)
    rank_load = sl.sum(axis=2)  # [A, W]
    hot = rank_load.argmax(axis=1)  # [A]
    top = rank_load[rows, hot]
    hot_load, hot_expert = sl[rows, hot], sx[rows, hot]  # [A, S]
    moved = hot_load[:, None, :, None] - sl[:, :, None, :]  # [A, W, S_hot, S_other]
    pair_max = np.maximum(top[:, None, None, None] - moved, rank_load[:, :, None, None] + moved)
    layer = active[:, None, None]
    on_other = holds[layer, np.arange(num_ranks)[None, :, None], hot_expert[:, None, :]] > 0  # [A, W, S_hot]
    on_hot = holds[layer, hot[:, None, None], sx] > 0  # [A, W, S_other]
    ok = (moved > 0) & ~on_other[:, :, :, None] & ~on_hot[:, :, None, :]
    ok &= (np.arange(num_ranks)[None, :] != hot[:, None])[:, :, None, None]
    noise = MIN_GAIN_STANDARD_ERRORS * np.sqrt(hot_load[:, None, :, None] + sl[:, :, None, :])
    ok &= top[:, None, None, None] - pair_max > np.maximum(noise, 1e-9 * top[:, None, None, None])
    flat = np.where(ok, pair_max, np.inf).reshape(num_active, -1)
    best = flat.argmin(axis=1)
    improved = np.isfinite(flat[rows, best])
    other, i, j = np.unravel_index(best, (num_ranks, num_slots, num_slots))
    for a in np.flatnonzero(improved):
        n, h, r, x, y = active[a], hot[a], other[a], sx[a, hot[a], i[a]], sx[a, other[a], j[a]]
        slots[n, h, i[a]], slots[n, r, j[a]] = y, x
        slot_load[n, h, i[a]], slot_load[n, r, j[a]] = sl[a, r, j[a]], sl[a, h, i[a]]
        holds[n, h, x] -= 1
        holds[n, h, y] += 1
        holds[n, r, y] -= 1
        holds[n, r, x] += 1
    return improved
