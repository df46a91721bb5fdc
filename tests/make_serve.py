"""`make serve` as a user runs it on a fresh clone: this checkout's own model_repository/ and
models/tiny, the admin key generated, the gateway beside tritonserver, every default kept. Only
the ports (free ones) and the files it writes its keys to (in the test's own folder, so that a
server the developer runs beside the tests keeps its keys) differ.

Fault and hostile-input tests run against this, so that what they show holds for `make serve`
itself, not only for a model repository a test has prepared."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from csm_triton.tools.server import ADMIN_KEY_ENV, ServerOptions, TritonServer, admin_headers, free_ports

PROJECT_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 600.0  # make serve may first make models/tiny


@dataclass
class MakeServe:
    """A running `make serve`: tritonserver's `options` (as `TritonServer` has them, so the tests'
    helpers for a server take this too), the gateway's port, and the make process."""

    folder: Path
    options: ServerOptions = field(default_factory=ServerOptions)
    gateway_port: int = 0
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log_file(self) -> Path:
        return self.folder / "serve.log"

    @property
    def admin_key_file(self) -> Path:
        return self.folder / "admin-key"

    @property
    def voices_key_file(self) -> Path:
        """The key that creating and deleting voices takes, written by csm_triton.tools.serve."""
        return self.folder / "voices-key"

    http_url = TritonServer.http_url  # from its options, as a TritonServer's
    grpc_url = TritonServer.grpc_url

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def admin_headers(self, protocol: str) -> dict[str, str]:
        return admin_headers(self.admin_key_file.read_text(), protocol)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def start(self) -> MakeServe:
        http, grpc, metrics, gateway = free_ports(4)
        self.options = ServerOptions(PROJECT_ROOT / "model_repository", http, grpc, metrics)
        self.gateway_port = gateway
        self.env = {name: value for name, value in os.environ.items() if name != ADMIN_KEY_ENV and not name.startswith("CSM_GATEWAY_")}
        self.env.update(
            HTTP_PORT=str(http), GRPC_PORT=str(grpc), METRICS_PORT=str(metrics), GATEWAY_PORT=str(gateway),
            SERVE_ARGS=f"--admin-key-file={self.admin_key_file} --voices-key-file={self.voices_key_file}",
        )  # fmt: skip
        with open(self.log_file, "w") as log:
            self.process = subprocess.Popen(
                ["make", "--no-print-directory", "serve"], cwd=PROJECT_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as Ctrl-C stops it
            )  # fmt: skip
        self.wait_until_serving(START_TIMEOUT_S)
        return self

    def wait_until_serving(self, timeout_s: float) -> None:
        """Until the gateway's /health says csm_stream is ready."""
        deadline = time.monotonic() + timeout_s
        while self.status(f"{self.gateway_url}/health") != 200:
            if self.process.poll() is not None:
                raise RuntimeError(f"make serve exited with {self.process.returncode}:\n{self.log()[-5000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"make serve did not serve within {timeout_s:.0f} s:\n{self.log()[-5000:]}")
            time.sleep(0.5)

    @staticmethod
    def status(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0

    def stop(self, timeout_s: float = 120.0) -> int | None:
        """Ctrl-C, as in the terminal: the whole process group gets SIGINT."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def gateway(self) -> psutil.Process:
        """The `python -m csm_triton.tools.serve` process (under make), where the gateway runs."""
        for process in psutil.Process(self.process.pid).children(recursive=True):
            if "csm_triton.tools.serve" in process.cmdline():
                return process
        raise AssertionError("make serve runs no gateway")

    def tritonserver(self) -> psutil.Process:
        for process in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if process.name() == "tritonserver":
                    return process
            except psutil.NoSuchProcess:
                continue
        raise AssertionError("make serve runs no tritonserver")

    def stub(self, model: str) -> psutil.Process:
        """The live python-backend stub of `model` (killed stubs stay as zombies of tritonserver)."""
        script = str(self.options.model_repository / model / "1" / "model.py")
        for process in self.tritonserver().children():
            try:
                if process.status() != psutil.STATUS_ZOMBIE and script in process.cmdline():
                    return process
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no live stub process for {model}")
