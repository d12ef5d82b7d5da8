"""Comparator only: an independent numpy port of DeepSeek's published EPLB algorithm (deepseek-ai/EPLB).

Written from its description (../shared/reference/runtime-anchors.md section 2.1): balanced_packing,
replicate_experts, the hierarchical policy and the global one. Kept apart from moe_runtime's planners and
used only to compare against them; nothing in the runtime or the operator imports it.
"""

from __future__ import annotations

import numpy as np

# L layers, E logical experts, P physical slots (replicas), G gpus


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """[L, n] items -> pack_index, rank_in_pack [L, n]: LPT into equal-cardinality packs."""
    num_layers, num_items = weight.shape
    assert num_items % num_packs == 0, "items must divide evenly into packs"
    per_pack = num_items // num_packs
    if per_pack == 1:
        return np.tile(np.arange(num_items), (num_layers, 1)), np.zeros(
            (num_layers, num_items), dtype=np.int64
        )
    pack_index = np.full((num_layers, num_items), -1, dtype=np.int64)
    rank_in_pack = np.full_like(pack_index, -1)
    for layer in range(num_layers):
        pack_weight = [0.0] * num_packs
        pack_items = [0] * num_packs
        for item in np.argsort(-weight[layer], kind="stable"):
            pack = min((p for p in range(num_packs) if pack_items[p] < per_pack), key=pack_weight.__getitem__)
            pack_index[layer, item] = pack
            rank_in_pack[layer, item] = pack_items[pack]
            pack_weight[pack] += float(weight[layer, item])
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[L, E] -> phy2log, replica rank [L, P], logcnt [L, E]: each extra slot to max load / count."""
    num_layers, num_log = weight.shape
    assert num_phy >= num_log
    phy2log = np.tile(np.arange(num_phy), (num_layers, 1))
    rank = np.zeros((num_layers, num_phy), dtype=np.int64)
    logcnt = np.ones((num_layers, num_log), dtype=np.int64)
    rows = np.arange(num_layers)
    for slot in range(num_log, num_phy):
        chosen = (weight / logcnt).argmax(axis=-1)
        phy2log[:, slot] = chosen
        rank[:, slot] = logcnt[rows, chosen]
        logcnt[rows, chosen] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups -> nodes, replicate within each node, pack replicas onto the node's GPUs."""
    num_layers, num_log = weight.shape
    assert num_log % num_groups == 0 and num_groups % num_nodes == 0
    assert num_gpus % num_nodes == 0 and num_physical % num_gpus == 0
    group_size, groups_per_node = num_log // num_groups, num_groups // num_nodes
    phy_per_gpu = num_physical // num_gpus
    # step 1: pack expert groups onto nodes; renumber so each node's experts are contiguous ("mlog")
    group_pack, group_rank = balanced_packing(
        weight.reshape(num_layers, num_groups, group_size).sum(-1), num_nodes
    )
    log2mlog = ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size)
    log2mlog = log2mlog.reshape(num_layers, num_log)
    mlog2log = _inverse(log2mlog)
    # step 2: replicate within each node
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, 1).reshape(-1, num_log // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical // num_nodes)
    # step 3: pack the replicas (load / count each) onto the node's GPUs
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, 1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack_index * phy_per_gpu + rank_in_pack)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, 1).reshape(num_layers, num_nodes, -1)
    pphy2mlog = (pphy2mlog + np.arange(0, num_log, num_log // num_nodes)[None, :, None]).reshape(
        num_layers, -1
    )
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, 1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, 1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, 1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Policy switch: hierarchical when groups divide over nodes, else global. -> phy2log, log2phy, logcnt."""
    weight = np.asarray(weight, dtype=np.float64)
    num_layers, num_log = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_gpus
        )
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_cnt = int(logcnt.max())
    log2phy = np.full((num_layers, num_log * max_cnt), -1, dtype=np.int64)
    np.put_along_axis(
        log2phy, phy2log * max_cnt + phyrank, np.tile(np.arange(num_replicas), (num_layers, 1)), 1
    )
    return phy2log, log2phy.reshape(num_layers, num_log, max_cnt), logcnt


def eplb_global(expert_load: np.ndarray, num_ranks: int, slots_per_rank: int) -> np.ndarray:
    """The global policy (1 group, 1 node) on [L, E] loads -> phy2log [L, W*S]."""
    phy2log, _, _ = rebalance_experts(expert_load, num_ranks * slots_per_rank, 1, 1, num_ranks)
    return phy2log


def to_placement(phy2log: np.ndarray, num_ranks: int, version: int = 0):
    """phy2log [L, P] (slot p on GPU p // (P / W), as in EPLB) -> moe_runtime.placement.Placement."""
    from moe_runtime.placement import Placement

    return Placement(version, num_ranks, phy2log.shape[1] // num_ranks, phy2log.tolist())


README_WEIGHT = np.array(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)  # EPLB README: 2 layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs


def readme_example_balancedness() -> list[float]:
    """Per-layer avg/max GPU load of the hierarchical plan on the README example (anchors: 0.83, 0.81)."""
    phy2log, _, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    per_replica = np.take_along_axis(README_WEIGHT / logcnt, phy2log, 1).reshape(2, 8, 2).sum(-1)
    return (per_replica.mean(1) / per_replica.max(1)).round(2).tolist()


if __name__ == "__main__":
    print(rebalance_experts(README_WEIGHT, 16, 4, 2, 8)[0])
    print("balancedness per layer:", readme_example_balancedness())
