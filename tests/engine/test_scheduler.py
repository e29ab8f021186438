"""Continuous-batching scheduler and engine bookkeeping, with a fake runner (no model, no torch math)."""

from __future__ import annotations

import pytest

from moeserve.engine.engine import ContextLengthError, Engine, EngineConfig
from moeserve.engine.request import Request, SamplingParams
from moeserve.engine.scheduler import Batch, QueueFullError, Scheduler, SchedulerConfig, SlotMove


class LetterTokenizer:
    """Token i decodes to the letter chr(97 + i % 26); token 0 is end-of-sequence."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids if not (skip_special_tokens and i == 0))


class FakeRunner:
    """Emits, per request, the tokens of a script keyed by its first prompt token; tracks slot contents."""

    def __init__(self, scripts: dict[int, list[int]], fail_on_step: int | None = None) -> None:
        self.scripts = scripts
        self.slots: dict[int, str] = {}
        self.batches: list[Batch] = []
        self.fail_on_step = fail_on_step
        self.released: list[str] = []

    def execute(self, batch: Batch) -> list[int]:
        if self.fail_on_step is not None and len(self.batches) == self.fail_on_step:
            self.batches.append(batch)
            raise RuntimeError("injected failure")
        self.batches.append(batch)
        tokens = []
        for offset, request in enumerate(batch.requests):
            slot = batch.first_slot + offset
            if batch.kind == "prefill":
                self.slots[slot] = request.request_id
            assert self.slots[slot] == request.request_id, "request ran in another request's slot"
            tokens.append(self.scripts[request.prompt_ids[0]][len(request.output_ids)])
        return tokens

    def move_slot(self, move: SlotMove) -> None:
        self.slots[move.target] = self.slots.pop(move.source)

    def release(self, request: Request) -> None:
        self.released.append(request.request_id)


def make_engine(scripts, max_running=2, max_waiting=8, max_context=64, fail_on_step=None) -> tuple[Engine, FakeRunner]:
    runner = FakeRunner(scripts, fail_on_step)
    config = EngineConfig(SchedulerConfig(max_running=max_running, max_waiting=max_waiting), max_context=max_context)
    return Engine(runner, LetterTokenizer(), config, eos_token_id=0), runner


def run_all(engine: Engine) -> dict[str, list]:
    outputs: dict[str, list] = {}
    while engine.has_work():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    return outputs


def test_admit_prefill_then_decode_with_dense_slots():
    scheduler = Scheduler(SchedulerConfig(max_running=2, max_prefill_tokens=100))
    requests = [Request(f"r{i}", [1] * 10, SamplingParams()) for i in range(3)]
    for request in requests:
        scheduler.add(request)
    batch = scheduler.schedule()
    assert batch is not None and batch.kind == "prefill" and [r.request_id for r in batch.requests] == ["r0", "r1"]
    assert [r.slot for r in requests[:2]] == [0, 1] and scheduler.num_waiting == 1
    batch = scheduler.schedule()
    assert batch is not None and batch.kind == "decode" and batch.first_slot == 0 and len(batch.requests) == 2
    move = scheduler.finish(requests[0])
    assert move == SlotMove(source=1, target=0, length=requests[1].num_tokens)
    assert requests[1].slot == 0 and scheduler.running == [requests[1]]
    batch = scheduler.schedule()
    assert batch is not None and batch.kind == "prefill" and batch.first_slot == 1 and requests[2].slot == 1


def test_prefill_token_budget_splits_admission_but_one_always_fits():
    scheduler = Scheduler(SchedulerConfig(max_running=8, max_prefill_tokens=25))
    for i, length in enumerate([10, 10, 40]):
        scheduler.add(Request(f"r{i}", [1] * length, SamplingParams()))
    assert [r.request_id for r in scheduler.schedule().requests] == ["r0", "r1"]  # type: ignore[union-attr]
    assert [r.request_id for r in scheduler.schedule().requests] == ["r2"]  # type: ignore[union-attr]


def test_min_prefill_fill_stops_admission_before_heavy_padding():
    scheduler = Scheduler(SchedulerConfig(max_running=8, max_prefill_tokens=1000, min_prefill_fill=0.75))
    for i, length in enumerate([100, 90, 20, 100, 80]):
        scheduler.add(Request(f"r{i}", [1] * length, SamplingParams()))
    # r0 + r1: 190 of 200 padded tokens real; + r2 would be 210 of 300 (0.70 < 0.75): stop, in order.
    assert [r.request_id for r in scheduler.schedule().requests] == ["r0", "r1"]  # type: ignore[union-attr]
    # r2 alone starts the next batch; r3 would make it 120 of 200 (0.6).
    assert [r.request_id for r in scheduler.schedule().requests] == ["r2"]  # type: ignore[union-attr]
    assert [r.request_id for r in scheduler.schedule().requests] == ["r3", "r4"]  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="min_prefill_fill"):
        SchedulerConfig(min_prefill_fill=1.5)


def test_waiting_queue_is_bounded():
    scheduler = Scheduler(SchedulerConfig(max_running=1, max_waiting=2))
    scheduler.add(Request("a", [1], SamplingParams()))
    scheduler.add(Request("b", [1], SamplingParams()))
    with pytest.raises(QueueFullError):
        scheduler.add(Request("c", [1], SamplingParams()))


def test_engine_runs_more_requests_than_slots_and_each_finishes_once():
    scripts = {i: [(i * 7 + j) % 25 + 1 for j in range(50)] for i in range(1, 6)}
    engine, runner = make_engine(scripts, max_running=2)
    max_tokens = {1: 3, 2: 9, 3: 1, 4: 6, 5: 4}
    ids = {engine.add_request([i, 9, 9], SamplingParams(max_tokens=max_tokens[i])).request_id: i for i in scripts}
    outputs = run_all(engine)
    assert set(outputs) == set(ids)
    for request_id, pieces in outputs.items():
        i = ids[request_id]
        assert [p.finished for p in pieces] == [False] * (len(pieces) - 1) + [True]
        assert pieces[-1].finish_reason == "length" and pieces[-1].completion_tokens == max_tokens[i]
        tokens = [t for p in pieces for t in p.token_ids]
        assert tokens == scripts[i][: max_tokens[i]]
        assert "".join(p.text for p in pieces) == LetterTokenizer().decode(tokens)
    assert max(len(b.requests) for b in runner.batches) == 2
    assert sorted(runner.released) == sorted(ids)


def test_eos_and_stop_strings_end_requests_and_stop_text_is_cut():
    # tokens 1,2,3 -> "bcd"; stop "cd" cuts after "b"; eos (0) ends the other request.
    engine, _ = make_engine({1: [1, 2, 3, 4, 5], 2: [5, 6, 0, 7]})
    stop_id = engine.add_request([1], SamplingParams(max_tokens=5, stop=("cd",))).request_id
    eos_id = engine.add_request([2], SamplingParams(max_tokens=4)).request_id
    outputs = run_all(engine)
    assert outputs[stop_id][-1].finish_reason == "stop"
    assert "".join(p.text for p in outputs[stop_id]) == "b"
    assert outputs[eos_id][-1].finish_reason == "stop"
    assert "".join(p.text for p in outputs[eos_id]) == "fg" and outputs[eos_id][-1].completion_tokens == 2


def test_ignore_eos_generates_max_tokens():
    engine, _ = make_engine({2: [5, 0, 7, 0]})
    request_id = engine.add_request([2], SamplingParams(max_tokens=4, ignore_eos=True)).request_id
    final = run_all(engine)[request_id][-1]
    assert final.finish_reason == "length" and final.completion_tokens == 4


def test_abort_frees_the_slot_for_waiting_requests():
    engine, runner = make_engine({1: list(range(1, 40)), 2: list(range(1, 40))}, max_running=1)
    first = engine.add_request([1], SamplingParams(max_tokens=30)).request_id
    second = engine.add_request([2], SamplingParams(max_tokens=2)).request_id
    engine.step()
    engine.step()
    engine.abort(first)
    outputs = run_all(engine)
    assert outputs[first][-1].finish_reason == "abort"
    assert outputs[second][-1].finish_reason == "length" and outputs[second][-1].completion_tokens == 2
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_context_and_queue_limits_raise_clear_errors():
    engine, _ = make_engine({1: [1] * 10}, max_running=1, max_waiting=1, max_context=16)
    with pytest.raises(ContextLengthError, match="maximum context length is 16 tokens"):
        engine.add_request([1] * 10, SamplingParams(max_tokens=7))
    engine.add_request([1], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFullError):
        engine.add_request([1], SamplingParams(max_tokens=2))


def test_a_failed_model_step_ends_its_batch_with_error_and_the_engine_goes_on():
    engine, _ = make_engine({1: [3, 4, 5], 2: [6, 7, 8]}, max_running=1, fail_on_step=0)
    failed = engine.add_request([1], SamplingParams(max_tokens=3)).request_id
    later = engine.add_request([2], SamplingParams(max_tokens=3)).request_id
    outputs = run_all(engine)
    assert outputs[failed][-1].finish_reason == "error" and "injected failure" in (outputs[failed][-1].error or "")
    assert outputs[later][-1].finish_reason == "length"


def test_sampling_params_validate():
    for bad in ({"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"stop": ("",)}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)  # type: ignore[arg-type]
