"""Read ahead: produce the next items of an iterator in a background thread while the caller works.

An ingest alternates reading a file (disk, decompression, decoding: CPU and I/O) with computing it
(mostly the device). :func:`prefetch` overlaps the two: while the caller handles item ``i``, a
thread produces item ``i + 1``, and at most ``ahead`` items are produced beyond the one the caller
holds, so memory stays bounded by ``ahead + 1`` volumes. Items arrive in the source's order; an
exception the source raises is raised to the caller at the position it happened, after the items
before it. Leaving the loop early (``break``, an exception in the caller) stops the thread after the
item it is producing.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()  # end of the source


class _Raised:
    """An exception from the source, carried to the consumer's thread."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(source: Iterable[T], ahead: int = 1, *, name: str = "prefetch") -> Iterator[T]:
    """Iterate ``source`` in a daemon thread, at most ``ahead`` items ahead of the caller."""
    if ahead < 1:
        raise ValueError(f"ahead must be at least 1, got {ahead}; iterate the source directly for no read-ahead")
    slots = threading.Semaphore(ahead)  # one slot per item that may be produced before the caller asks
    items: queue.SimpleQueue[object] = queue.SimpleQueue()
    stop = threading.Event()

    def produce() -> None:
        try:
            iterator = iter(source)
            while True:
                slots.acquire()
                if stop.is_set():
                    return
                try:
                    item = next(iterator)
                except StopIteration:
                    items.put(_DONE)
                    return
                items.put(item)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            items.put(_Raised(exc))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            slots.release()  # the caller now holds this item: the thread may produce the next one
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        slots.release()  # wake a thread waiting for a slot so that it sees the stop
        thread.join()
