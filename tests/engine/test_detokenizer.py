"""The incremental detokenizer against the plain reference (the whole output decoded at once)."""

from __future__ import annotations

import inspect
import random

import pytest

from moeserve.engine.engine import Detokenizer, decode_full

TEXTS = [
    inspect.getsource(random)[:3000],
    "naïve café — 東京 ✓ emoji 🙂🚀 and ascii after, déjà vu\n\ttabs  and  spaces",
    "x" * 40 + " end",
]


def _stream(tokenizer, token_ids: list[int], stop: tuple[str, ...]) -> tuple[str, bool]:
    """Feed tokens one at a time as the engine does; the last push is final."""
    detokenizer = Detokenizer(tokenizer, stop)
    pieces = []
    for end in range(1, len(token_ids) + 1):
        pieces.append(detokenizer.push(token_ids[:end], final=end == len(token_ids)))
        if detokenizer.stopped:
            break
    return "".join(pieces), detokenizer.stopped


@pytest.mark.parametrize("text", TEXTS, ids=["python-source", "multibyte", "repeats"])
def test_incremental_text_equals_full_decode(reference_model, text):
    tokenizer = reference_model.tokenizer
    ids = tokenizer(text)["input_ids"]
    streamed, stopped = _stream(tokenizer, ids, ())
    assert not stopped
    assert streamed == decode_full(tokenizer, ids)


def test_random_token_sequences_match_full_decode(reference_model):
    """Arbitrary ids (incomplete byte sequences, special tokens) still give the reference text."""
    tokenizer = reference_model.tokenizer
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        assert _stream(tokenizer, ids, ())[0] == decode_full(tokenizer, ids)


@pytest.mark.parametrize("stop", [("def ",), ("\n\n", "return"), ("🚀",), ("never-there",)])
def test_stop_strings_cut_at_the_first_match(reference_model, stop):
    tokenizer = reference_model.tokenizer
    ids = tokenizer(TEXTS[0][:1500] + TEXTS[1])["input_ids"]
    full = decode_full(tokenizer, ids)
    cuts = [i for i in (full.find(s) for s in stop) if i >= 0]
    streamed, stopped = _stream(tokenizer, ids, stop)
    assert stopped == bool(cuts)
    assert streamed == (full[: min(cuts)] if cuts else full)
