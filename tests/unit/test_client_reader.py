"""The API side reads the worker's pipe itself (no reader thread) and hands each request its
items through an inbox: messages the worker sends with a plain multiprocessing `Connection`
come out whole and in order, however the reads cut them, and a closed pipe reads as the
worker's end."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import select
import threading

import pytest

from pensieve.engine.client import _Inbox, _Reader, _write_frame
from pensieve.engine.types import SeqOutput, StepOutput


def _read_all(reader: _Reader, count: int) -> list[object]:
    got: list[object] = []
    while len(got) < count:
        select.select([reader.fd], [], [], 10)
        got.extend(reader.read())
    return got


def test_messages_of_every_size_arrive_whole_and_in_order() -> None:
    ours, theirs = multiprocessing.Pipe(duplex=True)
    outputs = [SeqOutput(f"r{i}", 0, f"t{i}", [i]) for i in range(3)]
    sent: list[object] = [
        StepOutput(outputs, 3, 0, 3),
        b"x" * 100_000,                    # over multiprocessing's one-write size
        list(range(200_000)),              # several reads of the reader's chunk
        "é" * 7,
        *[StepOutput([], 0, 0, 0)] * 50,   # many small ones in one read
    ]
    writer = threading.Thread(target=lambda: [theirs.send(m) for m in sent])
    writer.start()
    reader = _Reader(ours, gen=1)
    got = _read_all(reader, len(sent))
    writer.join()
    assert got == sent
    assert reader._buf == b""


def test_a_message_cut_anywhere_is_kept_until_its_rest_arrives() -> None:
    ours, theirs = multiprocessing.Pipe(duplex=True)
    reader = _Reader(ours, gen=1)
    reader.CHUNK = 3  # every read takes at most 3 bytes: cuts inside headers and bodies
    sent = [{"a": i, "b": "y" * i} for i in range(20)]
    for m in sent:
        theirs.send(m)
    assert _read_all(reader, len(sent)) == sent


def test_the_worker_closing_its_end_is_the_end() -> None:
    ours, theirs = multiprocessing.Pipe(duplex=True)
    theirs.send("last")
    theirs.close()
    reader = _Reader(ours, gen=1)
    assert _read_all(reader, 1) == ["last"]
    with pytest.raises(EOFError):
        reader.read()


def test_the_inbox_hands_items_over_in_order_and_survives_a_cancelled_wait() -> None:
    asyncio.run(_inbox_in_order())


async def _inbox_in_order() -> None:
    inbox = _Inbox()
    waiting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    waiting.cancel()  # a request cancelled while it waits (the client left)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    inbox.put_nowait("a")
    inbox.put_nowait("b")
    assert [await inbox.get(), await inbox.get()] == ["a", "b"]
    later = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert not later.done()
    inbox.put_nowait("c")
    assert await asyncio.wait_for(later, 5) == "c"  # a put that wakes no one fails, not hangs


def test_a_large_request_goes_out_whole_while_the_loop_watches_the_socket() -> None:
    """uvloop makes a socket it watches non-blocking, and the API's sender thread writes to that
    same socket: a request larger than the socket's buffer (a long prompt, a big grammar) must
    wait for room, not fail halfway and leave the worker holding half a message."""
    import uvloop

    ours, theirs = multiprocessing.Pipe(duplex=True)
    sent = [{"grammar": "x" * 3_000_000}, "after"]
    got: list[object] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(ours.fileno(), lambda: None)
        assert not os.get_blocking(ours.fileno())  # what made Connection.send fail
        worker = threading.Thread(target=lambda: got.extend(theirs.recv() for _ in sent),
                                  daemon=True)
        worker.start()
        for msg in sent:
            await asyncio.to_thread(_write_frame, ours.fileno(), pickle.dumps(msg))
        await asyncio.to_thread(worker.join, 30)
        loop.remove_reader(ours.fileno())

    uvloop.run(main())
    assert got == sent
