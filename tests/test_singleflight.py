"""Callers asking the same thing at once share one question under way (``router.sinks.singleflight``)."""

from __future__ import annotations

import asyncio

import pytest

from router.sinks.singleflight import SingleFlight


async def test_callers_together_share_one_answer_or_its_error_and_later_ones_ask_again():
    asked: list[str] = []
    gate = asyncio.Event()

    async def question(key: str) -> str:
        asked.append(key)
        await gate.wait()
        if key == "bad":
            raise LookupError(f"no {key}")
        return f"answer {key}"

    lookups: SingleFlight[str] = SingleFlight()
    waiting = [
        asyncio.create_task(lookups.ask(key, lambda key=key: question(key)))
        for key in ["a"] * 5 + ["bad"] * 3
    ]
    await asyncio.sleep(0)
    gate.set()
    answers = await asyncio.gather(*waiting, return_exceptions=True)
    assert answers[:5] == ["answer a"] * 5
    assert [str(error) for error in answers[5:]] == ["no bad"] * 3
    assert asked == ["a", "bad"]
    assert await lookups.ask("a", lambda: question("a")) == "answer a"  # over: asked again
    assert asked == ["a", "bad", "a"]


async def test_a_caller_that_stops_waiting_does_not_stop_the_question_for_the_others():
    gate = asyncio.Event()

    async def question() -> int:
        await gate.wait()
        return 7

    lookups: SingleFlight[int] = SingleFlight()
    first = asyncio.create_task(lookups.ask("k", question))
    second = asyncio.create_task(lookups.ask("k", question))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    assert await second == 7
