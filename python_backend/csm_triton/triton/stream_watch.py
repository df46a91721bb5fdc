"""A watch over csm_stream, kept by the csm model: tritonserver 2.51 does not restart the stub process
of a decoupled python model that dies (kill -9, the OOM killer): the model stays READY, every new
request fails within a second with "Stub process '...' is not healthy", and the requests it had get
nothing ever again (csm_client/control.py says why; callers end those themselves by probing).

The watch sends csm_stream a PROBE every `interval_s`. When the answer shows its stub dead, or no
answer comes for `probe_timeout_s` (a busy csm_stream answers late, so this bound is long), it
reloads csm_stream, backing off between tries, and counts a try as done only once csm_stream has
served a real request again. If no try succeeds it unloads csm_stream, so that its readiness
reports not ready and an orchestrator replaces the server.

A reload is an unload, then a load: Triton answers a load of a model it counts as loaded, whose
files have not changed since, at once and without loading anything (under `make serve` the files
only change before the first reload, when Python writes model.py's bytecode beside it).

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from csm_client.control import PROBE, STUB_DEAD

from . import bls

logger = logging.getLogger("csm_triton.triton.watch")

RELOAD_HINT = (
    "csm reloads csm_stream only when tritonserver runs with --model-control-mode=explicit (with "
    "--load-model=* or --load-model=csm_stream --load-model=csm) and its HTTP endpoint on"
)
STOP_WAIT_S = 5.0
# A load of CSM-1B takes well under a minute on a GPU; past this the try counts as failed.
LOAD_TIMEOUT_S = 900.0
# The request that shows a reloaded csm_stream serving: one frame of codes (no audio to decode).
CHECK_TEXT = "Serving again."
CHECK_AUDIO_MS = 80


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

    def reload(self, model: str) -> None:
        """Unload, then load: a load alone of a model Triton counts as loaded is a no-op unless its files changed."""
        self.unload(model)
        self.load(model)

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
    (csm_triton/tools/server.py restricts them so; README "Admin endpoints")."""
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
        check_timeout_s: float,
    ) -> None:
        self.stream_model = stream_model
        self.interval_s, self.probe_timeout_s = interval_s, probe_timeout_s
        self.reload_tries, self.reload_backoff_s = reload_tries, reload_backoff_s
        self.check_timeout_s = check_timeout_s  # how long the request that shows csm_stream serving may take
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
            logger.error(
                "%s's process has died (%s): its requests in flight end as their callers' probes find it", self.stream_model, death
            )
            if self._server is None:
                logger.error("%s is left dead and the watch stops: %s; restart the server", self.stream_model, RELOAD_HINT)
                return
            self._reload(self._server)

    def _death(self) -> str | None:
        """Why csm_stream's process counts as dead; None while it answers, or fails for another
        reason (busy, not loaded, unloading), which is logged when it changes."""
        try:
            problem = bls.control(self.stream_model, {PROBE: True}, self.probe_timeout_s)
        except bls.TimedOut:
            return f"it answered no probe for {self.probe_timeout_s:.0f} s"
        if problem is not None and STUB_DEAD.search(problem):
            return problem
        if problem != self._problem:
            logger.info("%s probe: %s", self.stream_model, problem or "answered")
            self._problem = problem
        return None

    def _reload(self, server: ServerControl) -> None:
        """Reloads csm_stream until it serves a request again, or unloads it after the last failed try."""
        died = time.monotonic()
        for attempt in range(1, self.reload_tries + 1):
            logger.warning("reloading %s: unload, then load (try %d of %d)", self.stream_model, attempt, self.reload_tries)
            try:
                server.reload(self.stream_model)
            except (OSError, RuntimeError) as error:
                logger.error("reloading %s failed: %s", self.stream_model, error)
            else:
                failure = self._serving_check()
                if failure is None:
                    logger.info(
                        "%s serves again: reloaded and served a request %.1f s after its death was seen",
                        self.stream_model,
                        time.monotonic() - died,
                    )
                    return
                logger.error("%s was loaded again but did not serve a request: %s", self.stream_model, failure)
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

    def _serving_check(self) -> str | None:
        """Asks csm_stream for one frame of codes; None once it came, else why it did not."""
        inputs = [
            pb_utils.Tensor("TEXT", np.array([[CHECK_TEXT.encode()]], dtype=object)),
            pb_utils.Tensor("SPEAKER", np.zeros((1, 1), dtype=np.int32)),
            pb_utils.Tensor("MAX_AUDIO_LENGTH_MS", np.array([[CHECK_AUDIO_MS]], dtype=np.int32)),
        ]
        deadline = bls.Deadline(self.check_timeout_s, "the watch's check that csm_stream serves")
        call = bls.DecoupledCall(self.stream_model, inputs, ["AUDIO_CODES"], deadline=deadline, stoppable=True)
        try:
            codes = [pb_utils.get_output_tensor_by_name(response, "AUDIO_CODES") for response in call]
            frames = sum(tensor.as_numpy().shape[1] for tensor in codes if tensor is not None)
        except bls.RequestFailed as failure:
            return str(failure)
        finally:
            call.close()
        return None if frames else "it answered without a frame of codes"
