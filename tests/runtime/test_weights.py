"""weights.py: bad checkpoints fail at load with the file and tensor named; presets init randomly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_runtime.errors import CheckpointError, ConfigError
from moe_runtime.model import ModelArgs
from moe_runtime.weights import init_random, load_checkpoint, load_model

EXPERT = "model.layers.1.block_sparse_moe.experts.2.w3.weight"


def _rewrite(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def test_missing_tensor_is_named(tiny_checkpoint):
    path, _ = tiny_checkpoint
    _rewrite(path, lambda t: t.pop(EXPERT))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) " + EXPERT.replace(".", r"\.")):
        load_checkpoint(path)


def test_extra_tensor_is_named_with_its_file(tiny_checkpoint):
    path, _ = tiny_checkpoint
    file = _rewrite(path, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=rf"{file}.*unexpected tensor 'model\.layers\.0\.mystery\.weight'"):
        load_checkpoint(path)


def test_misshaped_tensor_is_named_with_both_shapes(tiny_checkpoint):
    path, _ = tiny_checkpoint
    file = _rewrite(path, lambda t: t.update({EXPERT: torch.zeros(95, 64)}))
    with pytest.raises(CheckpointError, match=rf"{file}.*{EXPERT}.*\[95, 64\], expected \[96, 64\]"):
        load_checkpoint(path)


def test_corrupt_safetensors_header_names_the_file(tiny_checkpoint):
    path, _ = tiny_checkpoint
    file = path / "model.safetensors"
    file.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=rf"{file}: corrupt safetensors"):
        load_checkpoint(path)


def test_truncated_safetensors_fails_clearly(tiny_checkpoint):
    path, _ = tiny_checkpoint
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(file)):
        load_checkpoint(path)


def test_wrong_architecture_in_config_is_rejected(tiny_checkpoint):
    path, _ = tiny_checkpoint
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        load_checkpoint(path)


def test_missing_config_field_is_named(tiny_checkpoint):
    path, _ = tiny_checkpoint
    config = json.loads((path / "config.json").read_text())
    del config["num_local_experts"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_local_experts"):
        load_checkpoint(path)


def test_pickle_weights_are_refused(tmp_path, tiny_checkpoint):
    path, _ = tiny_checkpoint
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors required"):
        load_checkpoint(path)


def test_unknown_source_lists_presets():
    with pytest.raises(CheckpointError, match="tiny"):
        load_model("no-such-model")


def test_invalid_model_args_are_rejected():
    with pytest.raises(ConfigError, match="top_k"):
        ModelArgs(num_experts=4, top_k=5)


def test_random_init_is_deterministic_for_a_seed():
    args = ModelArgs.from_name("tiny")
    a, b = init_random(args, seed=7), init_random(args, seed=7)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
