"""aiohttp internals (checked against aiohttp 3.14.5)."""

from __future__ import annotations

from typing import Any

__all__ = ["arrived_before_failure"]


def arrived_before_failure(content: Any, n: int) -> bytes:
    """Up to ``n`` bytes that an aiohttp ``StreamReader`` (a response's ``content``) received before its connection
    failed, which its reads no longer return.

    Once aiohttp records a failure (a dropped connection, a read timeout), every public read raises at once and the
    bytes it had buffered are dropped (asyncio's own streams do the same, cpython issue 75044). Whether a reader made
    progress before a drop then depended on whether its read came before the event loop saw the end of the
    connection: under drops every 200 kB a shard could be read from byte 0 four times and fail. This takes them from
    the buffer through the private ``StreamReader._read_nowait``; if it moves, nothing is kept (retries resume after
    the last byte returned) and the tests fail."""
    read = getattr(content, "_read_nowait", None)
    if read is None or content.exception() is None:
        return b""
    return read(n)
