"""A watch over csm_stream, kept by the csm model: tritonserver 2.51 does not restart the stub process
of a decoupled python model that dies (kill -9, the OOM killer): the model stays READY, every new
request fails within a second with "Stub process '...' is not healthy", and the requests it had get
nothing ever again.

The watch sends csm_stream a PROBE (csm_triton/bls.py) every `interval_s`. When the answer shows its
stub dead, or no answer comes for `probe_timeout_s` (a busy csm_stream answers late, so this bound is
long), it hands the death to `on_death` (csm ends its requests in flight) and reloads csm_stream,
backing off between tries. If no try succeeds it unloads csm_stream, so that the server's readiness
(strict readiness, Triton's default) reports not ready and an orchestrator replaces it.

Loads and unloads go to the server's own HTTP repository API (`ServerControl`), not to
`pb_utils.load_model`: in python backend 24.10 that call holds this process's interpreter until the
load is done (csm answers nothing meanwhile), and a load that fails sometimes kills the calling stub
(seen here in explicit mode and, for the refusal of other modes, in two tries of five).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from csm_triton import bls

logger = logging.getLogger("csm_triton.triton.watch")

RELOAD_HINT = (
    "csm reloads csm_stream only when tritonserver runs with --model-control-mode=explicit (with "
    "--load-model=* or --load-model=csm_stream --load-model=csm) and its HTTP endpoint on"
)
STOP_WAIT_S = 5.0
# A load of CSM-1B takes well under a minute on a GPU; past this the try counts as failed.
LOAD_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class ServerControl:
    """tritonserver's model-repository API over HTTP, at the address its command line gives."""

    url: str
    headers: dict[str, str]  # the admin key's header, when the repository API is restricted

    @classmethod
    def of_server(cls, args: Sequence[str]) -> ServerControl | None:
        """From tritonserver's arguments; None unless model control is explicit and HTTP is on."""
        if _flag(args, "--model-control-mode", "none").lower() != "explicit":
            return None
        if _flag(args, "--allow-http", "true").lower() not in ("true", "1", "yes", "on"):
            return None
        address = _flag(args, "--http-address", "0.0.0.0")
        host = "127.0.0.1" if address in ("0.0.0.0", "") else address
        return cls(f"http://{host}:{_flag(args, '--http-port', '8000')}/v2/repository/models", _admin_headers(args))

    def load(self, model: str) -> None:
        self._post(f"{self.url}/{model}/load")

    def unload(self, model: str) -> None:
        self._post(f"{self.url}/{model}/unload")

    def _post(self, url: str) -> None:
        """Raises RuntimeError with the server's message when it refuses."""
        request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json", **self.headers})
        try:
            with urllib.request.urlopen(request, timeout=LOAD_TIMEOUT_S):
                return
        except urllib.error.HTTPError as error:
            body = error.read().decode(errors="replace")
            try:
                message = json.loads(body).get("error", body)
            except ValueError:
                message = body
            raise RuntimeError(f"HTTP {error.code}: {message}") from None


def server_args() -> list[str]:
    """tritonserver's command line: this stub process's parent."""
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _admin_headers(args: Sequence[str]) -> dict[str, str]:
    """The header that `--http-restricted-api=<apis>:<header>=<key>` asks of model-repository calls
    (csm_triton/server.py restricts them so; README "Admin endpoints")."""
    apis, _, key_value = _flag(args, "--http-restricted-api", "").partition(":")
    header, _, key = key_value.partition("=")
    return {header: key} if "model-repository" in apis.split(",") and header else {}


def _flag(args: Sequence[str], name: str, default: str) -> str:
    """The last value of `--name=value` or `--name value` in `args`."""
    value = default
    for index, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            value = arg.split("=", 1)[1]
        elif arg == name and index + 1 < len(args):
            value = args[index + 1]
    return value


class StreamWatch:
    """The watch's thread, started at once; `stop` ends it."""

    def __init__(
        self,
        stream_model: str,
        interval_s: float,
        probe_timeout_s: float,
        reload_tries: int,
        reload_backoff_s: float,
        on_death: Callable[[str], int],
    ) -> None:
        self.stream_model = stream_model
        self.interval_s, self.probe_timeout_s = interval_s, probe_timeout_s
        self.reload_tries, self.reload_backoff_s = reload_tries, reload_backoff_s
        self._on_death = on_death  # ends the requests in flight; returns how many it ended
        self._problem: str | None = None  # the last probe's error, logged when it changes
        self._server = ServerControl.of_server(server_args())
        if self._server is None:
            logger.warning("if %s's process dies, it is not reloaded: %s", stream_model, RELOAD_HINT)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="csm-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=STOP_WAIT_S)  # a probe or reload under way is left to end alone

    def _watch(self) -> None:
        while not self._stopping.wait(self.interval_s):
            death = self._death()
            if death is None:
                continue
            ended = self._on_death(death)
            logger.error("%s's process has died (%s): ended the %d requests in flight through csm", self.stream_model, death, ended)
            if self._server is None:
                logger.error("%s is left dead and the watch stops: %s; restart the server", self.stream_model, RELOAD_HINT)
                return
            self._reload(self._server)

    def _death(self) -> str | None:
        """Why csm_stream's process counts as dead; None while it answers, or fails for another
        reason (busy, not loaded, unloading), which is logged when it changes."""
        try:
            problem = bls.control(self.stream_model, {bls.PROBE: True}, self.probe_timeout_s)
        except bls.TimedOut:
            return f"it answered no probe for {self.probe_timeout_s:.0f} s"
        if problem is not None and bls.STUB_DEAD.search(problem):
            return problem
        if problem != self._problem:
            logger.info("%s probe: %s", self.stream_model, problem or "answered")
            self._problem = problem
        return None

    def _reload(self, server: ServerControl) -> None:
        """Loads csm_stream again, or unloads it after the last failed try."""
        died = time.monotonic()
        for attempt in range(1, self.reload_tries + 1):
            if attempt > 1 and self._death() is None:  # reloaded meanwhile (another csm instance, an operator)
                return
            logger.warning("reloading %s (try %d of %d)", self.stream_model, attempt, self.reload_tries)
            try:
                server.load(self.stream_model)
            except (OSError, RuntimeError) as error:
                logger.error("reloading %s failed: %s", self.stream_model, error)
            else:
                logger.info("%s serves again: reloaded %.1f s after its death was seen", self.stream_model, time.monotonic() - died)
                return
            if attempt < self.reload_tries and self._stopping.wait(self.reload_backoff_s * 2 ** (attempt - 1)):
                return
        logger.error(
            "%s could not be reloaded in %d tries: unloading it, so that the server reports not ready and is replaced",
            self.stream_model,
            self.reload_tries,
        )
        try:
            server.unload(self.stream_model)
        except (OSError, RuntimeError) as error:
            logger.error("unloading %s failed too (%s): the server stays ready with it dead", self.stream_model, error)
