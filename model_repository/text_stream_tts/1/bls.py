"""Decoupled BLS calls whose responses a request's thread waits for with a timeout.

Each call is made and read on a thread of its own, which puts the responses on a queue. Why not
iterate `exec(decoupled=True)` directly: python backend 24.10 loses an error response that a
decoupled model sends after its first response (seen with an error sent with or without the final
flag), so an iterator whose callee fails mid-stream waits forever for a final response that never
comes; and a thread blocked in the iterator cannot notice its client cancelling. Read this way, a
request ends when its client cancels or when a callee has sent nothing for `timeout_s`, and only
the reading thread is left waiting.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import triton_python_backend_utils as pb_utils

# How often a request waiting for a response checks whether its client has cancelled.
POLL_S = 0.1
_END = object()


class RequestFailed(Exception):
    """Ends the request with this message and Triton error code."""

    def __init__(self, message: str, code) -> None:
        super().__init__(message)
        self.code = code


class DecoupledCall:
    """One decoupled BLS call, started at once; iterate it for its responses (errors included)."""

    def __init__(self, request, callee: str, timeout_s: float, is_cancelled: Callable[[], bool]) -> None:
        self.callee, self.timeout_s, self._is_cancelled = callee, timeout_s, is_cancelled
        self._responses: queue.Queue = queue.Queue()
        self._iterator = None
        self._last_response = time.monotonic()
        threading.Thread(target=self._read, args=(request,), name=f"bls-{callee}", daemon=True).start()

    def _read(self, request) -> None:
        try:
            self._iterator = request.exec(decoupled=True)  # returns with the first response
            for response in self._iterator:
                self._last_response = time.monotonic()
                self._responses.put(response)
        except Exception as error:  # refused (an unknown model, wrong tensors, ...): the request reports it
            self._responses.put(error)
        self._responses.put(_END)

    def __iter__(self) -> Iterator:
        """The responses in order, until the callee's final one. Raises RequestFailed (naming the
        callee) when the call was refused or went silent, or when the client cancelled."""
        while True:
            if self._is_cancelled():
                raise RequestFailed("cancelled by the client", pb_utils.TritonError.CANCELLED)
            try:
                item = self._responses.get(timeout=POLL_S)
            except queue.Empty:
                silent_s = time.monotonic() - self._last_response
                if silent_s > self.timeout_s:
                    raise RequestFailed(f"{self.callee}: sent nothing for {silent_s:.0f} s", pb_utils.TritonError.UNAVAILABLE) from None
                continue
            if item is _END:
                return
            if isinstance(item, Exception):
                raise RequestFailed(f"{self.callee}: {item}", pb_utils.TritonError.INTERNAL)
            yield item

    def close(self) -> None:
        """Lets go of the call once its request has ended: asks the callee to stop where the python
        backend can (ResponseIterator.cancel, after 24.10; in 24.10 the callee runs to its end and
        the reading thread drops what it sends), and forgets the client's request, which the
        reading thread may outlive."""
        self._is_cancelled = _given_up
        cancel = getattr(self._iterator, "cancel", None)
        if cancel is not None:
            cancel()


def _given_up() -> bool:
    return True
