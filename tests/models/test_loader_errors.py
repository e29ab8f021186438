"""Bad checkpoints get one clear CheckpointError naming the file and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moeserve.errors import CheckpointError
from moeserve.models.loader import load_model


@pytest.fixture()
def mixtral_copy(tiny_checkpoints, tmp_path) -> Path:
    folder = tmp_path / "mixtral"
    shutil.copytree(tiny_checkpoints["mixtral"], folder)
    return folder


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_model(tmp_path / "absent")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json: missing"):
        load_model(tmp_path)


def test_unsupported_family(mixtral_copy):
    config = json.loads((mixtral_copy / "config.json").read_text())
    config["model_type"] = "llama"
    (mixtral_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model_type 'llama' is not a supported MoE family; supported: deepseek_v2, deepseek_v3"):
        load_model(mixtral_copy)


def test_folder_without_weights(mixtral_copy):
    (mixtral_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights"):
        load_model(mixtral_copy)


def test_truncated_safetensors(mixtral_copy):
    weights = mixtral_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated: header needs \d+ bytes of tensor data, file has \d+"):
        load_model(mixtral_copy)


def test_corrupt_header(mixtral_copy):
    weights = mixtral_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"garbage!"
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(mixtral_copy)


def test_weights_that_do_not_match_config(mixtral_copy):
    config = json.loads((mixtral_copy / "config.json").read_text())
    config["intermediate_size"] = 64  # the file has 48
    (mixtral_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"do not match config.json: .*experts.*\(4, 32, 48\).*expects \(4, 32, 64\)|do not match config.json"):
        load_model(mixtral_copy)


def test_config_not_json(mixtral_copy):
    (mixtral_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load_model(mixtral_copy)


def test_loading_without_experts_checks_the_experts_shapes(mixtral_copy):
    config = json.loads((mixtral_copy / "config.json").read_text())
    config["intermediate_size"] = 64  # the file has 48
    (mixtral_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"do not match config.json: decoder layer 0 has experts \(E, D, I\) = \(8, 32, 48\) in the files, config expects \(8, 32, 64\)"):
        load_model(mixtral_copy, load_experts=False)


def test_loading_without_experts_names_a_missing_weight(mixtral_copy):
    from safetensors.torch import load_file, save_file

    weights = mixtral_copy / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.norm.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"weights missing from model.safetensors that config.json needs: model.norm.weight"):
        load_model(mixtral_copy, load_experts=False)
