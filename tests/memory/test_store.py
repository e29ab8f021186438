"""ExpertStore and the safetensors reader against tiny transformers checkpoints and hand-made files.

Reference: the expert weights of the same checkpoint loaded by transformers (which fuses experts
in memory into ``mlp.experts.gate_up_proj`` [E, 2I, D] and ``down_proj`` [E, D, I]).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeserve.errors import CheckpointError
from moeserve.memory.safetensors_file import (
    checkpoint_weight_files,
    read_header,
    read_tensor,
)
from moeserve.memory.store import ExpertStore

_SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _family(name: str):  # -> (model class, config, expected MoE layers, expected E)
    import transformers as tf

    if name == "mixtral":
        config = tf.MixtralConfig(**_SMALL, num_local_experts=4, num_experts_per_tok=2)
        return tf.MixtralForCausalLM, config, [0, 1], 4
    if name == "qwen2_moe":
        config = tf.Qwen2MoeConfig(
            **_SMALL,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
        )
        return tf.Qwen2MoeForCausalLM, config, [1], 4
    if name == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**_SMALL, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2)
        return tf.Qwen3MoeForCausalLM, config, [0, 1], 6
    if name == "olmoe":
        config = tf.OlmoeConfig(**_SMALL, num_experts=4, num_experts_per_tok=2)
        return tf.OlmoeForCausalLM, config, [0, 1], 4
    if name in ("deepseek_v2", "deepseek_v3"):
        # Multi-head latent attention, dense first layer, 4 routed experts (+ shared ones).
        deepseek = {
            **_SMALL, "num_hidden_layers": 3, "num_key_value_heads": 4, "moe_intermediate_size": 16,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "kv_lora_rank": 16,
            "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
        }
        if name == "deepseek_v2":
            return tf.DeepseekV2ForCausalLM, tf.DeepseekV2Config(**deepseek, n_shared_experts=2), [1, 2], 4
        config = tf.DeepseekV3Config(**deepseek, n_shared_experts=1, n_group=2, topk_group=1)
        return tf.DeepseekV3ForCausalLM, config, [1, 2], 4
    raise AssertionError(name)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]


@pytest.fixture(scope="session", params=FAMILIES)
def family_checkpoint(request, tmp_path_factory):
    """(folder, model loaded back by transformers, expected MoE layers, expected E) per family."""
    model_class, config, layers, num_experts = _family(request.param)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    model_class(config).save_pretrained(folder)
    loaded = model_class.from_pretrained(folder)
    return folder, loaded, layers, num_experts


@pytest.fixture(scope="session")
def sharded_mixtral(tmp_path_factory):
    """A Mixtral checkpoint split into several shards with an index, and the loaded model."""
    model_class, config, _, _ = _family("mixtral")
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("mixtral_sharded")
    model_class(config).save_pretrained(folder, max_shard_size="20KB")
    return folder, model_class.from_pretrained(folder)


def _assert_matches_model(store: ExpertStore, model, layer: int, expert: int) -> None:
    experts = model.model.layers[layer].mlp.experts
    read = store.read_expert(layer, expert)
    torch.testing.assert_close(read.gate_up, experts.gate_up_proj[expert].detach(), rtol=0, atol=0)
    torch.testing.assert_close(read.down, experts.down_proj[expert].detach(), rtol=0, atol=0)


def test_store_matches_transformers_per_family(family_checkpoint):
    folder, model, layers, num_experts = family_checkpoint
    store = ExpertStore(folder)
    assert store.layers == layers
    for layer in layers:
        assert store.num_experts(layer) == num_experts
        assert store.layer_spec(layer).layout == "per_expert"
        for expert in range(num_experts):
            _assert_matches_model(store, model, layer, expert)


def test_read_expert_reads_only_that_expert(family_checkpoint):
    folder, _, layers, num_experts = family_checkpoint
    store = ExpertStore(folder)
    layer, expert = layers[-1], num_experts - 1
    spec = store.layer_spec(layer)
    expected = 3 * spec.hidden_size * spec.intermediate_size * spec.torch_dtype.itemsize
    assert store.expert_nbytes(layer, expert) == expected
    store.read_expert(layer, expert)
    assert store.bytes_read == expected
    assert store.total_expert_bytes() == expected * num_experts * len(layers)
    # The expert's ranges are disjoint from every other expert's.
    mine = store.location(layer, expert).ranges
    for other in range(num_experts - 1):
        for a in store.location(layer, other).ranges:
            for b in mine:
                assert a.path != b.path or a.end <= b.begin or b.end <= a.begin


def test_cold_reads_read_the_same_bytes(family_checkpoint):
    """``cold_reads`` drops the shards' pages from the page cache; the bytes read are unchanged."""
    folder, _, layers, num_experts = family_checkpoint
    warm, cold = ExpertStore(folder), ExpertStore(folder, cold_reads=True)
    for layer in layers:
        for expert in (0, num_experts - 1):
            a, b = warm.read_expert(layer, expert), cold.read_expert(layer, expert)
            assert torch.equal(a.gate_up, b.gate_up) and torch.equal(a.down, b.down)
    assert cold.bytes_read == warm.bytes_read


def test_shared_experts_are_not_routed_experts(family_checkpoint):
    folder, _, layers, num_experts = family_checkpoint
    store = ExpertStore(folder)
    for layer in layers:
        names = {r.tensor for e in range(num_experts) for r in store.location(layer, e).ranges}
        assert not any("shared_expert" in name for name in names)
        assert len(names) == 3 * num_experts


def test_sharded_checkpoint(sharded_mixtral):
    folder, model = sharded_mixtral
    files = checkpoint_weight_files(folder)
    assert len(files) > 2 and all(f.parent == folder and f.name != "model.safetensors" for f in files)
    store = ExpertStore(folder)
    assert len({r.path for e in range(4) for r in store.location(1, e).ranges}) > 1
    for expert in range(4):
        _assert_matches_model(store, model, 1, expert)


def test_read_expert_dtype_conversion(sharded_mixtral):
    folder, model = sharded_mixtral
    read = ExpertStore(folder).read_expert(0, 2, dtype=torch.bfloat16)
    assert read.gate_up.dtype == read.down.dtype == torch.bfloat16
    expected = model.model.layers[0].mlp.experts.gate_up_proj[2].detach().to(torch.bfloat16)
    assert torch.equal(read.gate_up, expected)


# ---- hand-written fused layout -----------------------------------------------------------------


@pytest.fixture(scope="session")
def fused_checkpoint(tmp_path_factory):
    """Fused experts in layers 3 (F32, E=4) and 5 (BF16, E=3), D=8, I=6, plus non-expert tensors."""
    folder = tmp_path_factory.mktemp("fused")
    generator = torch.Generator().manual_seed(2)
    tensors = {
        "model.embed_tokens.weight": torch.randn(10, 8, generator=generator),
        "model.layers.3.mlp.gate.weight": torch.randn(4, 8, generator=generator),
        "model.layers.3.mlp.experts.gate_up_proj": torch.randn(4, 12, 8, generator=generator),
        "model.layers.3.mlp.experts.down_proj": torch.randn(4, 8, 6, generator=generator),
        "model.layers.5.mlp.experts.gate_up_proj": torch.randn(3, 12, 8, generator=generator).bfloat16(),
        "model.layers.5.mlp.experts.down_proj": torch.randn(3, 8, 6, generator=generator).bfloat16(),
    }
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, tensors


def test_fused_layout(fused_checkpoint):
    folder, tensors = fused_checkpoint
    store = ExpertStore(folder)
    assert store.layers == [3, 5]
    assert [store.num_experts(layer) for layer in store.layers] == [4, 3]
    spec = store.layer_spec(5)
    assert (spec.layout, spec.hidden_size, spec.intermediate_size, spec.dtype) == ("fused", 8, 6, "BF16")
    for layer in store.layers:
        gate_up = tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = tensors[f"model.layers.{layer}.mlp.experts.down_proj"]
        for expert in range(store.num_experts(layer)):
            before = store.bytes_read
            read = store.read_expert(layer, expert)
            assert torch.equal(read.gate_up, gate_up[expert]) and torch.equal(read.down, down[expert])
            # One dim-0 slice of each stacked tensor: 1/E of its bytes, nothing else.
            assert store.bytes_read - before == (gate_up.nbytes + down.nbytes) // store.num_experts(layer)
    assert store.total_expert_bytes() == sum(t.nbytes for n, t in tensors.items() if ".experts." in n)


def test_read_expert_into_checks_buffers(fused_checkpoint):
    folder, tensors = fused_checkpoint
    store = ExpertStore(folder)
    gate_up, down = torch.empty(12, 8), torch.empty(8, 6)
    store.read_expert_into(3, 1, gate_up, down)
    assert torch.equal(down, tensors["model.layers.3.mlp.experts.down_proj"][1])
    with pytest.raises(ValueError, match="gate_up buffer"):
        store.read_expert_into(5, 0, gate_up, down)  # layer 5 is BF16
    with pytest.raises(KeyError, match="MoE layers are"):
        store.read_expert(4, 0)
    with pytest.raises(IndexError, match="out of range"):
        store.location(5, 3)


# ---- safetensors reader --------------------------------------------------------------------------


def test_read_header_and_tensor_all_dtypes(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(4).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f64": torch.randn(2, dtype=torch.float64),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "i32": torch.arange(-3, 4, dtype=torch.int32),
        "i16": torch.tensor([-7, 9], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 3], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    assert set(header.tensors) == set(tensors)
    with safe_open(str(path), "pt") as reference:
        for name in tensors:
            assert list(header.tensors[name].shape) == reference.get_slice(name).get_shape()
    for name, tensor in tensors.items():
        read = read_tensor(header, name)
        assert read.dtype == tensor.dtype and torch.equal(read, tensor), name
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        read_tensor(header, "nope")


def _write_raw(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (b"{not json", b"", "is not valid JSON"),
        (b"[1, 2]", b"", "not an object"),
        ({"a": {"dtype": "F4X", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "dtype 'F4X'"),
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, bytes(12), "needs 16 bytes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, bytes(4), "end before they begin"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "malformed"),
        ({"a": {"dtype": "F32", "shape": [1]}}, bytes(4), "malformed"),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            bytes(24),
            "overlap",
        ),
        (
            {"a": {"dtype": "U8", "shape": [10], "data_offsets": [0, 10]}},
            bytes(7),
            "truncated: header needs 10",
        ),
        ({"__metadata__": {"format": 1}}, b"", "__metadata__"),
    ],
)
def test_read_header_rejects_corrupt_files(tmp_path, header, data, message):
    path = _write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message) as error:
        read_header(path)
    assert str(path) in str(error.value)


def test_read_header_rejects_short_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="fewer than the 8-byte header length"):
        read_header(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointError, match="header length field says 1000000000 bytes"):
        read_header(huge)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_header(tmp_path / "absent.safetensors")


def test_truncated_checkpoint(fused_checkpoint, tmp_path):
    folder, _ = fused_checkpoint
    source = folder / "model.safetensors"
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes(source.read_bytes()[:-5])
    data_start = read_header(source).data_start
    size = source.stat().st_size
    expected = (
        f"{truncated} is truncated: header needs {size - data_start} bytes of tensor data, "
        f"file has {size - data_start - 5}"
    )
    with pytest.raises(CheckpointError) as error:
        ExpertStore(tmp_path)
    assert str(error.value) == expected


# ---- finding the weight files ----------------------------------------------------------------


def test_weight_files_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_weight_files(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=f"no \\*.safetensors weights in {tmp_path}$"):
        checkpoint_weight_files(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*\.bin/\.pt checkpoints are not supported"):
        checkpoint_weight_files(tmp_path)


def test_index_naming_missing_shard(sharded_mixtral, tmp_path):
    folder, _ = sharded_mixtral
    for path in folder.iterdir():
        shutil.copy(path, tmp_path / path.name)
    shards = checkpoint_weight_files(tmp_path)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"names shard\\(s\\) missing .*{shards[1].name}"):
        ExpertStore(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="index.json is not valid JSON"):
        checkpoint_weight_files(tmp_path)


def test_unindexed_shards_are_globbed(tmp_path):
    save_file({"b": torch.ones(2)}, str(tmp_path / "part-2.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "part-1.safetensors"))
    assert [p.name for p in checkpoint_weight_files(tmp_path)] == ["part-1.safetensors", "part-2.safetensors"]


# ---- inconsistent expert sets --------------------------------------------------------------------


def _per_expert(layer: int, expert: int, names=("gate_proj", "up_proj", "down_proj"), i: int = 6, d: int = 4):
    shapes = {"gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}
    return {
        f"model.layers.{layer}.mlp.experts.{expert}.{name}.weight": torch.zeros(shapes[name])
        for name in names
    }


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"model.embed_tokens.weight": torch.zeros(2, 2)}, "no routed MoE expert tensors"),
        ({**_per_expert(0, 0), **_per_expert(0, 2)}, r"missing expert\(s\) \[1\]"),
        (_per_expert(0, 0, names=("gate_proj", "down_proj")), "has no up projection"),
        ({**_per_expert(0, 0), **_per_expert(0, 1, i=8)}, "all experts of a layer must match"),
        (
            {**_per_expert(0, 0), "model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv": torch.zeros(1)},
            "unsupported expert tensor",
        ),
        (
            {
                "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(2, 12, 4),
                "model.layers.0.mlp.experts.down_proj": torch.zeros(2, 6, 4),
            },
            r"expected \[E, 2I, D\] and \[E, D, I\]",
        ),
        ({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(2, 12, 4)}, "no experts.down_proj"),
        (
            {**_per_expert(0, 0), "layers.1.mlp.experts.gate_up_proj": torch.zeros(1)},
            "more than one layer stack",
        ),
    ],
)
def test_store_rejects_inconsistent_experts(tmp_path, tensors, message):
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        ExpertStore(tmp_path)


def test_file_truncated_after_header_was_read(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(8)}, str(path))
    header = read_header(path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="ended early"):
        read_tensor(header, "a")
