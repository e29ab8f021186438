"""moeserve-trace/1 files: round trips, every validation error, the writer, the real traces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeserve.errors import TraceError
from moeserve.traces.format import (
    TRACE_FORMAT,
    Trace,
    TraceMeta,
    TraceWriter,
    load_trace,
    save_trace,
)

SHARED_TRACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces"


def make_meta(num_experts: int = 8, top_k: int = 2, **extra: object) -> TraceMeta:
    return TraceMeta(
        model="test/tiny",
        num_experts=num_experts,
        top_k=top_k,
        phase="decode",
        source="unit test",
        extra=extra,
    )


def make_trace(with_weights: bool = True) -> Trace:
    """Three sequences of 2, 0 and 3 tokens; L=4 layers, E=8, K=2."""
    rng = np.random.default_rng(0)
    experts = rng.integers(0, 8, size=(5, 4, 2)).astype(np.int16)  # [T, L, K]
    experts[1, 2, :] = -1
    weights = rng.random((5, 4, 2), dtype=np.float32) if with_weights else None
    offsets = np.array([0, 2, 2, 5], dtype=np.int64)
    return Trace(experts=experts, offsets=offsets, meta=make_meta(layers="all four"), weights=weights)


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    return path


def valid_arrays(num_experts: int = 8) -> dict[str, np.ndarray]:
    """The arrays of a valid file: T=3, L=4, K=2, two sequences."""
    return {
        "experts": np.zeros((3, 4, 2), dtype=np.int16),
        "offsets": np.array([0, 1, 3], dtype=np.int64),
        "meta": np.array(make_meta(num_experts=num_experts).to_json()),
    }


# --- round trip and accessors -------------------------------------------------------------------


@pytest.mark.parametrize("with_weights", [True, False])
def test_save_then_load_returns_the_same_trace(tmp_path: Path, with_weights: bool) -> None:
    trace = make_trace(with_weights)
    path = save_trace(trace, tmp_path / "nested" / "run.trace")  # no .npz suffix: name kept as given
    assert path == tmp_path / "nested" / "run.trace"
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.trace"]

    loaded = load_trace(path)

    np.testing.assert_array_equal(loaded.experts, trace.experts)
    np.testing.assert_array_equal(loaded.offsets, trace.offsets)
    assert loaded.experts.dtype == np.int16 and loaded.offsets.dtype == np.int64
    if with_weights:
        assert loaded.weights is not None and loaded.weights.dtype == np.float32
        np.testing.assert_array_equal(loaded.weights, trace.weights)
    else:
        assert loaded.weights is None
    assert loaded.meta == trace.meta
    assert loaded.meta.extra == {"layers": "all four"}


def test_meta_is_stored_as_a_zero_dimensional_json_string(tmp_path: Path) -> None:
    path = save_trace(make_trace(), tmp_path / "t.npz")
    with np.load(path, allow_pickle=False) as archive:
        meta = archive["meta"]
    assert meta.shape == () and meta.dtype.kind == "U"
    document = json.loads(str(meta))
    assert document["format"] == TRACE_FORMAT
    assert document["num_experts"] == 8 and document["top_k"] == 2
    assert document["layers"] == "all four"


def test_meta_stored_as_utf8_bytes_is_read(tmp_path: Path) -> None:
    arrays = valid_arrays()
    arrays["meta"] = np.array(str(arrays["meta"]).encode("utf-8"))  # 0-d bytes array
    trace = load_trace(write_npz(tmp_path / "t.npz", **arrays))
    assert trace.meta.num_experts == 8


def test_properties_and_sequences() -> None:
    trace = make_trace()
    assert (trace.num_tokens, trace.num_layers, trace.num_sequences) == (5, 4, 3)

    sequences = list(trace.sequences())

    assert [sequence.index for sequence in sequences] == [0, 1, 2]
    assert [sequence.experts.shape for sequence in sequences] == [(2, 4, 2), (0, 4, 2), (3, 4, 2)]
    np.testing.assert_array_equal(sequences[2].experts, trace.experts[2:5])
    assert sequences[2].weights is not None
    np.testing.assert_array_equal(sequences[2].weights, trace.weights[2:5])
    assert np.shares_memory(sequences[0].experts, trace.experts)  # views, not copies
    with pytest.raises(IndexError):
        trace.sequence(3)


def test_sequences_without_weights_have_none() -> None:
    assert all(sequence.weights is None for sequence in make_trace(with_weights=False).sequences())


# --- the writer ---------------------------------------------------------------------------------


def test_writer_concatenates_sequences_and_narrows_ids_to_int16() -> None:
    writer = TraceWriter(make_meta())
    first = np.array([[[0, 1]], [[2, 3]]], dtype=np.int64)  # [t=2, L=1, K=2], as torch.topk gives
    second = np.array([[[7, -1]]], dtype=np.int64)  # [t=1, L=1, K=2]
    writer.add_sequence(first, weights=np.full((2, 1, 2), 0.5))
    writer.add_sequence(second, weights=np.ones((1, 1, 2)))
    assert (writer.num_sequences, writer.num_tokens) == (2, 3)

    trace = writer.build()

    assert trace.experts.dtype == np.int16 and trace.weights is not None and trace.weights.dtype == np.float32
    np.testing.assert_array_equal(trace.experts[:, 0, :], [[0, 1], [2, 3], [7, -1]])
    np.testing.assert_array_equal(trace.offsets, [0, 2, 3])
    np.testing.assert_array_equal(trace.weights[:, 0, 0], [0.5, 0.5, 1.0])


def test_writer_copies_its_input() -> None:
    writer = TraceWriter(make_meta())
    buffer = np.zeros((1, 1, 2), dtype=np.int64)
    writer.add_sequence(buffer)
    buffer[:] = 5
    assert writer.build().experts.max() == 0


def test_writer_save_round_trips(tmp_path: Path) -> None:
    writer = TraceWriter(make_meta())
    writer.add_sequence(np.ones((4, 3, 2), dtype=np.int32))
    loaded = load_trace(writer.save(tmp_path / "w.npz"))
    assert (loaded.num_tokens, loaded.num_layers, loaded.num_sequences) == (4, 3, 1)
    assert loaded.weights is None


def test_writer_with_no_sequences_needs_num_layers() -> None:
    with pytest.raises(TraceError, match="no sequences added"):
        TraceWriter(make_meta()).build()
    empty = TraceWriter(make_meta(), num_layers=3).build()
    assert empty.experts.shape == (0, 3, 2)
    assert empty.num_sequences == 0


def test_writer_rejects_ids_that_would_wrap_in_int16() -> None:
    writer = TraceWriter(make_meta(num_experts=8))
    ids = np.zeros((2, 3, 2), dtype=np.int64)
    ids[1, 2, 0] = 65_536  # wraps to 0 in int16
    with pytest.raises(TraceError, match="sequence 0: layer 2 has expert id 65536, but num_experts is 8"):
        writer.add_sequence(ids)


@pytest.mark.parametrize(
    ("experts", "weights", "message"),
    [
        (np.zeros((2, 3, 2), dtype=np.float32), None, "must be integers"),
        (np.zeros((2, 3), dtype=np.int64), None, r"shape \[t, L, 2\]"),
        (np.zeros((2, 3, 4), dtype=np.int64), None, r"shape \[t, L, 2\]"),
        (np.zeros((2, 5, 2), dtype=np.int64), None, "has 5 layers, expected 3"),
        (np.zeros((2, 3, 2), dtype=np.int64), np.zeros((2, 3, 2)), "earlier sequences had no weights"),
    ],
)
def test_writer_rejects_inconsistent_sequences(
    experts: np.ndarray, weights: np.ndarray | None, message: str
) -> None:
    writer = TraceWriter(make_meta())
    writer.add_sequence(np.zeros((1, 3, 2), dtype=np.int64))
    with pytest.raises(TraceError, match=message):
        writer.add_sequence(experts, weights)
    assert writer.num_sequences == 1  # a rejected sequence leaves the writer unchanged


def test_writer_rejects_weights_of_another_shape() -> None:
    writer = TraceWriter(make_meta())
    expected = r"sequence 0: weights shape \(2, 3, 1\) does not match experts shape \(2, 3, 2\)"
    with pytest.raises(TraceError, match=expected):
        writer.add_sequence(np.zeros((2, 3, 2), dtype=np.int64), np.zeros((2, 3, 1)))
    assert writer.num_sequences == 0


# --- validation of files ------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.npz"
    with pytest.raises(TraceError, match="absent.npz: no such trace file"):
        load_trace(path)


def test_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "notes.npz"
    path.write_text("experts, offsets\n")
    with pytest.raises(TraceError, match=r"notes.npz: not an .npz archive"):
        load_trace(path)


def test_plain_npy_file_is_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "experts.npy"
    np.save(path, np.zeros((2, 2, 2), dtype=np.int16))
    with pytest.raises(TraceError, match="experts.npy: not an .npz archive"):
        load_trace(path)


def test_missing_arrays_are_named(tmp_path: Path) -> None:
    arrays = valid_arrays()
    del arrays["offsets"], arrays["meta"]
    path = write_npz(tmp_path / "t.npz", **arrays)
    with pytest.raises(TraceError, match=r"t.npz: missing array\(s\) offsets, meta \(found experts\)"):
        load_trace(path)


def test_pickled_meta_is_refused(tmp_path: Path) -> None:
    arrays = valid_arrays()
    arrays["meta"] = np.array([{"format": TRACE_FORMAT}], dtype=object)
    path = write_npz(tmp_path / "t.npz", **arrays)
    with pytest.raises(TraceError, match="t.npz: cannot read the .npz archive"):
        load_trace(path)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("experts", np.zeros((3, 4, 2), dtype=np.int32), "experts has dtype int32, expected int16"),
        (
            "experts",
            np.zeros((3, 8), dtype=np.int16),
            r"experts has 2 dimensions \(shape \(3, 8\)\), expected 3",
        ),
        (
            "experts",
            np.zeros((3, 4, 3), dtype=np.int16),
            "experts has 3 slots per token .* but meta top_k is 2",
        ),
        ("offsets", np.array([0, 1, 3], dtype=np.int32), "offsets has dtype int32, expected int64"),
        ("offsets", np.array([[0, 3]], dtype=np.int64), "offsets has 2 dimensions"),
        ("offsets", np.array([], dtype=np.int64), "offsets is empty"),
        ("offsets", np.array([0, 2], dtype=np.int64), "offsets run from 0 to 2, but must cover the 3 rows"),
        ("offsets", np.array([1, 3], dtype=np.int64), "offsets run from 1 to 3"),
        (
            "offsets",
            np.array([0, 2, 1, 3], dtype=np.int64),
            r"not monotonic: offsets\[1\] = 2 > offsets\[2\] = 1",
        ),
        (
            "weights",
            np.zeros((3, 4, 1), dtype=np.float32),
            r"weights shape \(3, 4, 1\) does not match experts",
        ),
        ("weights", np.zeros((3, 4, 2), dtype=np.float64), "weights has dtype float64, expected float32"),
        ("weights", np.full((3, 4, 2), np.nan, dtype=np.float32), "weights contain NaN"),
        ("meta", np.array(["{}", "{}"]), "meta must be a single JSON string"),
        ("meta", np.array(3), "meta must be a single JSON string"),
        ("meta", np.array("not json"), "meta is not valid JSON"),
        ("meta", np.array("[1, 2]"), "meta must be a JSON object, got list"),
        ("meta", np.array('{"format": "moeserve-trace/1", "model": "m"}'), "missing key.*num_experts, top_k"),
    ],
)
def test_malformed_array_is_reported_with_the_file(
    tmp_path: Path, name: str, value: np.ndarray, message: str
) -> None:
    arrays = valid_arrays()
    arrays[name] = value
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(TraceError, match="bad.npz: " + ".*" + message):
        load_trace(path)


def meta_json(**changes: object) -> np.ndarray:
    document = json.loads(make_meta().to_json())
    document.update(changes)
    return np.array(json.dumps(document))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"format": "moeserve-trace/2"},
            "meta format is 'moeserve-trace/2', but this moeserve reads 'moeserve-trace/1'",
        ),
        ({"num_experts": 0}, "meta num_experts must be a positive integer, got 0"),
        ({"num_experts": "8"}, "meta num_experts must be a positive integer, got '8'"),
        ({"top_k": True}, "meta top_k must be a positive integer, got True"),
        ({"top_k": 9}, "meta top_k is 9, larger than num_experts 8"),
        ({"model": None}, "meta model must be a string, got None"),
    ],
)
def test_bad_meta_values(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    arrays = valid_arrays()
    arrays["meta"] = meta_json(**changes)
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(TraceError) as caught:
        load_trace(path)
    assert str(caught.value) == f"{path}: {message}"


def test_expert_id_out_of_range_names_layer_and_id(tmp_path: Path) -> None:
    arrays = valid_arrays(num_experts=64)
    arrays["experts"] = np.zeros((3, 5, 2), dtype=np.int16)
    arrays["experts"][2, 3, 1] = 71
    arrays["experts"][0, 4, 0] = 99  # a later layer is not the one reported
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(TraceError) as caught:
        load_trace(path)
    assert str(caught.value) == f"{path}: layer 3 has expert id 71, but num_experts is 64"


def test_expert_id_below_minus_one_is_rejected(tmp_path: Path) -> None:
    arrays = valid_arrays()
    arrays["experts"][1, 0, 0] = -2
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(TraceError) as caught:
        load_trace(path)
    assert str(caught.value) == f"{path}: layer 0 has expert id -2; ids must be in [0, 8) or -1 for unknown"


def test_unknown_ids_are_valid(tmp_path: Path) -> None:
    arrays = valid_arrays()
    arrays["experts"][:] = -1
    assert (load_trace(write_npz(tmp_path / "t.npz", **arrays)).experts == -1).all()


# --- validation of objects built in memory ------------------------------------------------------


def test_trace_built_in_memory_is_validated() -> None:
    with pytest.raises(TraceError, match="trace: layer 0 has expert id 8, but num_experts is 8"):
        Trace(
            experts=np.full((1, 1, 2), 8, dtype=np.int16),
            offsets=np.array([0, 1], dtype=np.int64),
            meta=make_meta(),
        )
    with pytest.raises(TraceError, match="trace: experts has dtype int64, expected int16"):
        Trace(experts=np.zeros((1, 1, 2), dtype=np.int64), offsets=np.array([0, 1]), meta=make_meta())


def test_meta_validation() -> None:
    with pytest.raises(TraceError, match="trace meta: meta top_k is 3, larger than num_experts 2"):
        make_meta(num_experts=2, top_k=3)
    with pytest.raises(TraceError, match=r"trace meta: meta extra reuses reserved key\(s\) top_k"):
        TraceMeta(model="m", num_experts=2, top_k=1, phase="p", source="s", extra={"top_k": 4, "note": "x"})


# --- the real traces ----------------------------------------------------------------------------


def real_trace_path(name: str) -> Path:
    path = SHARED_TRACES / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real traces live in ../shared beside the checkout")
    return path


@pytest.mark.parametrize(
    ("name", "shape", "num_sequences", "num_experts", "has_weights", "unknown"),
    [
        ("deepseek-v2-lite-puffin-a.npz", (23_702, 26, 6), 317, 64, False, 0),
        ("mixtral-8x7b-gsm8k.npz", (247, 32, 2), 2, 8, True, 30),
    ],
)
def test_real_traces_load(
    name: str,
    shape: tuple[int, int, int],
    num_sequences: int,
    num_experts: int,
    has_weights: bool,
    unknown: int,
) -> None:
    trace = load_trace(real_trace_path(name))
    assert trace.experts.shape == shape
    assert trace.num_sequences == num_sequences
    assert trace.meta.num_experts == num_experts
    assert trace.meta.top_k == shape[2]
    assert (trace.weights is not None) == has_weights
    assert int((trace.experts == -1).sum()) == unknown
    assert "layers" in trace.meta.extra  # descriptive keys beyond the required ones are kept
