"""triton_moe.align on CPU (plain torch, so CI checks it): groups in expert order, each padded to whole
M-blocks, slots in order within a group, dropped slots last, and the static bound on the padded length."""

import pytest
import torch

from moe_runtime.triton_moe import TILES_BY_SLOTS_PER_EXPERT, align, tiles_for

# T tokens, E experts, K top-k; S = T*K token-slots, slot s = t*K + k


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k"), [(1, 8, 2), (9, 8, 2), (333, 64, 6), (64, 4, 1)]
)
def test_align_pads_each_expert_group_to_whole_blocks_in_slot_order(num_tokens, num_experts, top_k, block_m):
    gen = torch.Generator().manual_seed(0)
    topk_ids = torch.randint(0, num_experts + 1, (num_tokens, top_k), generator=gen)  # id E: dropped
    num_slots = topk_ids.numel()
    sorted_slots, block_expert = align(topk_ids, num_experts, block_m)
    assert sorted_slots.numel() % block_m == 0 and block_expert.numel() == sorted_slots.numel() // block_m
    assert sorted_slots.numel() <= num_slots + min(num_experts + 1, num_slots) * (block_m - 1) + block_m
    flat = topk_ids.reshape(-1)
    blocks = sorted_slots.view(-1, block_m)  # [R / BM, BM]
    for e in range(num_experts + 1):
        rows = blocks[block_expert == e].reshape(-1)
        want = torch.nonzero(flat == e).reshape(-1)  # this group's slots, in slot order
        assert torch.equal(rows[rows < num_slots], want.to(torch.int32))
        assert rows.numel() == -(-want.numel() // block_m) * block_m
    assert (block_expert == torch.sort(block_expert).values).all()  # groups in expert order
    assert (blocks[block_expert > num_experts] == num_slots).all()  # blocks past the last group: padding


def test_align_counts_every_id_past_the_last_expert_as_dropped():
    sorted_slots, block_expert = align(torch.tensor([[0, 9], [4, 1]]), 4, 16)
    assert block_expert.tolist()[:3] == [0, 1, 4]  # slots 1 (id 9) and 2 (id 4) form the dropped group
    assert sorted_slots[32:34].tolist() == [1, 2]


def test_tiles_grow_with_token_slots_per_expert():
    rows = [tiles_for(s, 8).block_m for s in (16, 128, 256, 1024, 8192)]
    assert rows == sorted(rows) and rows[0] == TILES_BY_SLOTS_PER_EXPERT[0][1].block_m
