"""A stream sends the deltas waiting in its queue as one event, in order, stopping at an end."""

from __future__ import annotations

import asyncio

from moeserve.engine.engine import RequestOutput
from moeserve.server.app import merge_pending_outputs


def _output(text: str, ids: list[int], count: int, finished: bool = False, reason: str | None = None) -> RequestOutput:
    return RequestOutput("r", text, ids, finished, reason, prompt_tokens=3, completion_tokens=count,
                         arrival_time=0.0, first_token_time=0.1, now=0.2 + count)


def _queue(*outputs: RequestOutput) -> asyncio.Queue:
    queue: asyncio.Queue = asyncio.Queue()
    for output in outputs:
        queue.put_nowait(output)
    return queue


def test_waiting_deltas_merge_in_order_up_to_the_finish():
    queue = _queue(_output("lo", [2], 2), _output(" wor", [3], 3), _output("ld", [4], 4, True, "stop"),
                   _output("never", [9], 5))
    merged, carry = merge_pending_outputs(_output("Hel", [1], 1), queue)
    assert carry is None
    assert merged.text == "Hello world" and merged.token_ids == [1, 2, 3, 4]
    assert merged.finished and merged.finish_reason == "stop" and merged.completion_tokens == 4
    assert queue.qsize() == 1  # nothing is taken past the finished output


def test_an_error_is_carried_after_the_text_before_it():
    error = _output("", [], 2, True, "error")
    queue = _queue(_output("b", [2], 2), error, _output("c", [3], 3))
    merged, carry = merge_pending_outputs(_output("a", [1], 1), queue)
    assert merged.text == "ab" and merged.token_ids == [1, 2] and not merged.finished
    assert carry is error
    assert queue.qsize() == 1


def test_an_empty_queue_or_a_finished_output_is_left_as_it_is():
    first = _output("a", [1], 1)
    assert merge_pending_outputs(first, _queue()) == (first, None)
    done = _output("z", [5], 5, True, "length")
    queue = _queue(_output("x", [6], 6))
    assert merge_pending_outputs(done, queue) == (done, None) and queue.qsize() == 1
