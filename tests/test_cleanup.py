"""CleanupTask: its coroutine always begins, whatever cancels it and when."""

from __future__ import annotations

import asyncio

import pytest

from pybus.cleanup import CleanupTask


async def cleanup(log: list[str]) -> str:
    try:
        log.append("began")
        await asyncio.sleep(0)
        log.append("not cancelled")
        return "done"
    finally:
        log.append("cleaned up")


async def test_a_cancellation_before_the_first_step_reaches_the_first_await_inside_the_try() -> None:
    log: list[str] = []
    task = CleanupTask(cleanup(log), loop=asyncio.get_running_loop(), name="t")
    assert task.cancel() is True  # before its first step
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["began", "cleaned up"]
    assert task.cancelled()


async def test_a_plain_task_cancelled_so_would_skip_the_cleanup() -> None:
    """What CleanupTask is for: asyncio's own behaviour, pinned."""
    log: list[str] = []
    task = asyncio.get_running_loop().create_task(cleanup(log))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == []


async def test_uncancelled_it_is_a_task_like_any_other() -> None:
    log: list[str] = []
    task = CleanupTask(cleanup(log), loop=asyncio.get_running_loop(), name="t")
    assert await task == "done"
    assert log == ["began", "not cancelled", "cleaned up"]
    assert task.get_name() == "t"


async def test_a_cancellation_after_it_began_is_delivered_at_once() -> None:
    log: list[str] = []
    task = CleanupTask(cleanup(log), loop=asyncio.get_running_loop(), name="t")
    await asyncio.sleep(0)  # it began and waits
    assert task.cancel("stop") is True
    with pytest.raises(asyncio.CancelledError, match="stop"):
        await task
    assert log == ["began", "cleaned up"]


async def test_several_cancellations_before_it_began_arrive_as_one() -> None:
    seen: list[int] = []

    async def counts() -> None:
        try:
            await asyncio.sleep(0)
        finally:
            task = asyncio.current_task()
            assert task is not None
            seen.append(task.cancelling())

    task = CleanupTask(counts(), loop=asyncio.get_running_loop(), name="t")
    task.cancel()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [1]


async def test_a_coroutine_that_finishes_without_awaiting_still_runs_and_ends_cancelled() -> None:
    ran: list[str] = []

    async def at_once() -> str:
        ran.append("ran")
        return "result"

    task = CleanupTask(at_once(), loop=asyncio.get_running_loop(), name="t")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran == ["ran"]  # the work ran; the cancellation asked for is what the task reports


def test_the_loop_ending_just_after_it_was_created_still_runs_its_cleanup() -> None:
    log: list[str] = []

    async def main() -> None:
        task = CleanupTask(cleanup(log), loop=asyncio.get_running_loop(), name="t")
        assert not task.done()
        # main returns: asyncio.run cancels the task before its first step

    asyncio.run(main())
    assert log == ["began", "cleaned up"]
