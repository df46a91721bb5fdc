"""The stub's client of csm_stream's engine process: starts it, watches it, restarts it, and hands
each request's messages to the request's handler.

Why a second process: the one that holds torch, the weights, the KV caches and Mimi is the one
that dies when something goes badly wrong (the kernel's OOM killer takes the largest process; a
CUDA fault leaves its context unusable until the process exits). The Triton stub keeps every
request's response sender, and a stub that dies takes them along: its requests never end (python
backend 24.10 has no cleanup for a dead decoupled stub). Kept apart, the stub outlives the engine:
when the engine process dies, hangs or says it cannot serve, every request it had ends at once
with an error, and a new engine process starts, so the model serves again by itself.

This module imports no torch: it runs in the Triton stub. `engine_worker` is the child's side, and
protocol.py holds the messages between them.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import signal
import subprocess
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from multiprocessing.connection import Pipe
from typing import Any

from ..engine.pacing import ChunkPlan
from ..request import GenerationRequest, audio_key
from .protocol import Cancel, Channel, ChunkOut, Close, Generate, Heartbeat, Ready, Refused, StartFailed, Status, WorkerSettings
from .serving import ServingConfig

logger = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_S = 30.0  # silence after which the worker is taken for hung and killed
CLOSE_TIMEOUT_S = 30.0
CLIP_KEYS = 4096  # clips remembered as sent whole to the running engine process, the oldest forgotten
DELIVERY_THREADS = 4  # handlers that may block at once before the others' messages wait


class WorkerUnavailable(RuntimeError):
    """The engine process cannot take requests now (restarting, or given up)."""


Handler = Callable[[ChunkOut | Refused], None]


class _Worker:
    """One engine process and the thread that reads its messages."""

    def __init__(
        self, python: str, settings: WorkerSettings, start_timeout_s: float, heartbeat_timeout_s: float, on_message: Callable[[Any], None]
    ) -> None:
        ours, theirs = Pipe(duplex=True)
        command = [python, "-m", "csm_triton.triton.engine_worker", str(theirs.fileno()), settings.instance_name]
        self.process = subprocess.Popen(command, pass_fds=[theirs.fileno()])
        theirs.close()
        self.channel = Channel(ours)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.last_message = time.monotonic()
        self.health: str | None = None
        self.ended = threading.Event()
        self.send(settings)
        self.ready = self._handshake(start_timeout_s)
        self._on_message = on_message
        self._reader = threading.Thread(target=self._read_forever, name="csm-engine-reader", daemon=True)
        self._reader.start()

    def _handshake(self, timeout_s: float) -> Ready:
        deadline = time.monotonic() + timeout_s
        while not self.channel.poll(1.0):
            if self.process.poll() is not None:
                raise WorkerUnavailable(f"the engine process exited while loading ({describe_exit(self.process.returncode)})")
            if time.monotonic() > deadline:
                self.kill()
                raise WorkerUnavailable(f"the engine process did not load within {timeout_s:.0f} s")
        try:
            message = self.channel.recv()
        except EOFError:
            self.process.wait()
            raise WorkerUnavailable(f"the engine process exited while loading ({describe_exit(self.process.returncode)})") from None
        if isinstance(message, StartFailed):
            self.process.wait()
            raise WorkerUnavailable(message.message)
        return message

    def send(self, message: Any) -> None:
        self.channel.send(message)

    def _read_forever(self) -> None:
        try:
            while True:
                message = self.channel.recv()
                self.last_message = time.monotonic()
                if isinstance(message, Heartbeat):
                    self.health = message.health
                self._on_message(message)
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception("reading the engine process's messages failed")
        self.ended.set()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def end_reason(self) -> str | None:
        """Why this worker can no longer serve (killed here if it is still running), or None."""
        if self.ended.is_set() or self.process.poll() is not None:
            self.ended.wait(5)
            self.process.wait()
            return f"the engine process exited ({describe_exit(self.process.returncode)})"
        silent_s = time.monotonic() - self.last_message
        if silent_s > self.heartbeat_timeout_s:
            self.kill()
            return f"the engine process sent nothing for {silent_s:.0f} s and was killed"
        if self.health is not None:
            self.kill()
            return f"the engine process could not serve ({self.health}) and was restarted"
        return None


class _Outboxes:
    """Each request's messages, handed to its handler in order on a few threads of their own.

    A handler sends to a Triton client, and a send can block (the python backend waits for the
    server to take each response). Handed on from the thread that reads the engine's messages, one
    stuck send would stop the reading: no heartbeat read, the engine taken for hung and killed, and
    every request lost for one. Here it holds up its own request, and one delivery thread."""

    def __init__(self, threads: int = DELIVERY_THREADS) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, deque[tuple[Handler, Any]]] = {}  # keys with messages not yet handed on
        self._ready: queue.SimpleQueue[int] = queue.SimpleQueue()  # keys to drain, each once while pending
        self._idle = threading.Condition(self._lock)
        for index in range(threads):
            threading.Thread(target=self._deliver_forever, name=f"csm-delivery-{index}", daemon=True).start()

    def put(self, key: int, handler: Handler, message: ChunkOut | Refused) -> None:
        with self._lock:
            box = self._pending.get(key)
            if box is not None:  # a thread is draining it, and will take this too
                box.append((handler, message))
                return
            self._pending[key] = deque([(handler, message)])
        self._ready.put(key)

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether every message was handed on within `timeout_s`."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._pending, timeout_s)

    def _deliver_forever(self) -> None:
        while True:
            key = self._ready.get()
            while True:
                with self._lock:
                    box = self._pending[key]
                    if not box:
                        del self._pending[key]
                        self._idle.notify_all()
                        break
                    handler, message = box.popleft()
                _call(handler, message)


class WorkerClient:
    """The Triton model's way to the engine process: generate, cancel, stats; restarts behind the scenes.

    `on_give_up(reason)` is called, once, when the engine could not be kept running: more than
    `max_restarts` ends within `restart_window_s`, or a restart that fails."""

    def __init__(
        self,
        python: str,
        settings: WorkerSettings,
        on_give_up: Callable[[str], None],
        start_timeout_s: float = ServingConfig.engine_start_timeout_s,
        max_restarts: int = ServingConfig.max_engine_restarts,
        restart_window_s: float = ServingConfig.engine_restart_window_s,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
    ) -> None:
        self.python, self.settings, self.on_give_up = python, settings, on_give_up
        self.start_timeout_s, self.max_restarts, self.restart_window_s = start_timeout_s, max_restarts, restart_window_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.restarts = 0  # engine processes started after the first
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._handlers: dict[int, Handler] = {}  # requests submitted and not yet ended
        self._keys = itertools.count()
        self._down: str | None = "the engine is starting"  # why it cannot take requests now; None while it can
        self._ends: deque[float] = deque()  # when recent engine processes ended
        self._closing = threading.Event()
        self._heartbeat: Heartbeat | None = None
        self._outboxes = _Outboxes()
        self._clips_sent: OrderedDict[str, None] = OrderedDict()  # keys of clips the running engine process has had whole
        self._whole: dict[int, Generate] = {}  # requests sent with clips left out, until their first answer

    def start(self) -> Ready:
        """Start the first engine process and the thread that watches it; raises
        WorkerUnavailable with the worker's own message when it cannot load."""
        ready = self._launch()
        threading.Thread(target=self._supervise, name="csm-engine-supervisor", daemon=True).start()
        return ready

    def generate(self, request: GenerationRequest, handler: Handler, decode_audio: bool, chunking: ChunkPlan) -> int:
        """Hand a request, checked against Ready.limits, to the engine process; `handler` gets its
        chunks (or its refusal, or its loss as an UNAVAILABLE refusal) on a delivery thread, in
        order, the last one exactly once. A context clip sent whole before is named by its content
        key instead: it goes whole again only if the engine process no longer holds its codes.
        Raises WorkerUnavailable."""
        with self._lock:
            names_clips = self._worker is not None and self._worker.ready.codes_cache_bytes > 0
        # Hashed outside the lock (a long clip takes tens of ms), and not at all without a codes cache.
        clips = [
            (index, audio_key(s.audio, s.sample_rate)) for index, s in enumerate(request.context) if s.audio is not None and names_clips
        ]
        with self._lock:
            if self._down is not None:
                raise WorkerUnavailable(self._down)
            key = next(self._keys)
            self._handlers[key] = handler
            worker = self._worker
            message = whole = Generate(key, request, decode_audio, chunking)
            named = tuple(clip for clip in clips if clip[1] in self._clips_sent)
            if named:
                message = _leaving_out(whole, named)
                self._whole[key] = whole
            self._remember(clip_key for _, clip_key in clips)
        try:
            worker.send(message)
        except OSError as error:  # the worker is gone; the supervisor is about to notice
            with self._lock:
                self._handlers.pop(key, None)
            raise WorkerUnavailable(f"the engine process is gone: {error}") from error
        return key

    def cancel(self, key: int) -> None:
        with self._lock:
            worker = self._worker if key in self._handlers else None
        if worker is not None:
            try:
                worker.send(Cancel(key))
            except OSError:
                pass  # gone: the request is lost anyway, and its handler told so

    @property
    def heartbeat(self) -> Heartbeat | None:
        """The worker's latest stats and health; None while no engine runs."""
        return self._heartbeat

    @property
    def down(self) -> str | None:
        """Why requests cannot be taken now, or None."""
        return self._down

    def close(self) -> None:
        """Let the engine cancel what it runs and send the last chunks, then stop it."""
        self._closing.set()
        with self._lock:
            self._down, worker = "the model is unloading", self._worker
        if worker is None:
            return
        try:
            worker.send(Close())
        except OSError:
            pass
        try:
            worker.process.wait(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.error("the engine process did not exit within %.0f s of closing; killing it", CLOSE_TIMEOUT_S)
        worker.kill()
        worker.ended.wait(5)
        self._lose_all("the model was unloaded")
        if not self._outboxes.wait_idle(CLOSE_TIMEOUT_S):
            logger.error("some requests' last messages could not be handed on within %.0f s of closing", CLOSE_TIMEOUT_S)

    def _launch(self) -> Ready:
        worker = _Worker(self.python, self.settings, self.start_timeout_s, self.heartbeat_timeout_s, self._dispatch)
        with self._lock:
            self._worker, self._down = worker, None
        logger.info("engine process %d ready: %d slots on %s", worker.process.pid, worker.ready.slots, worker.ready.device)
        return worker.ready

    def _remember(self, keys: Iterable[str]) -> None:
        """Note clips as sent whole (with _lock held)."""
        for clip_key in keys:
            self._clips_sent[clip_key] = None
            self._clips_sent.move_to_end(clip_key)
        while len(self._clips_sent) > CLIP_KEYS:
            self._clips_sent.popitem(last=False)

    def _dispatch(self, message: Any) -> None:
        """A message from the worker, on the reader thread."""
        if isinstance(message, Heartbeat):
            self._heartbeat = message
            return
        with self._lock:
            whole = self._whole.pop(message.key, None)
            worker = self._worker
        if isinstance(message, Refused) and message.status is Status.CLIP_UNKNOWN and whole is not None:
            try:
                worker.send(whole)  # its clips whole, which the engine process encodes and caches again
                return
            except OSError:  # gone: the supervisor ends the request
                return
        last = not isinstance(message, ChunkOut) or message.finish is not None
        with self._lock:
            handler = self._handlers.pop(message.key, None) if last else self._handlers.get(message.key)
        if handler is not None:
            self._outboxes.put(message.key, handler, message)

    def _lose_all(self, reason: str) -> None:
        with self._lock:
            handlers, self._handlers = self._handlers, {}
            self._whole.clear()
            self._clips_sent.clear()  # a new engine process starts with an empty codes cache
        for key, handler in handlers.items():
            self._outboxes.put(key, handler, Refused(key, Status.UNAVAILABLE, f"{reason}; the request was lost"))

    def _supervise(self) -> None:
        """Watch the engine process; when it ends, fail its requests and start another."""
        while not self._closing.is_set():
            self._worker.ended.wait(1.0)
            reason = self._worker.end_reason()
            if reason is None:
                continue
            if self._closing.is_set():
                return
            logger.error("%s", reason)
            with self._lock:
                self._down = f"{reason}; a new one is starting"
            self._heartbeat = None
            self._lose_all(reason)
            now = time.monotonic()
            self._ends.append(now)
            while self._ends and now - self._ends[0] > self.restart_window_s:
                self._ends.popleft()
            if len(self._ends) > self.max_restarts:
                self._give_up(f"{len(self._ends)} engine processes ended within {self.restart_window_s:.0f} s, the last: {reason}")
                return
            try:
                self._launch()
            except Exception as error:  # WorkerUnavailable, or the spawn itself failed
                self._give_up(f"restarting the engine failed: {error}")
                return
            self.restarts += 1

    def _give_up(self, reason: str) -> None:
        logger.error("giving up on the engine: %s", reason)
        with self._lock:
            self._down = f"csm_stream cannot serve: {reason}"
        self._lose_all(reason)
        self.on_give_up(reason)


def _leaving_out(message: Generate, clips: tuple[tuple[int, str], ...]) -> Generate:
    """`message` with the audio of the clips named by key left out of its context."""
    indices = {index for index, _ in clips}
    context = [dataclasses.replace(s, audio=None, is_audio=None) if i in indices else s for i, s in enumerate(message.request.context)]
    return dataclasses.replace(message, request=dataclasses.replace(message.request, context=context), clips=clips)


def _call(handler: Handler, message: ChunkOut | Refused) -> None:
    try:
        handler(message)
    except Exception:  # one request's transport must not stop the others'
        logger.exception("handling the engine's message for request %d failed", message.key)


def describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"
