"""Run a real tritonserver on a model repository, with or without NVIDIA's container.

Inside NVIDIA's container `tritonserver` is on the PATH and used as it is. Elsewhere the binary,
python backend and stubs bundled in the `nvidia-pytriton` wheel are used: the stub must match the
running Python and find this venv's interpreter and libpython (ENVIRONMENT.md).

  python -m csm_triton.server [--model-repository DIR] [--http-port N] [--grpc-port N] [--metrics-port N]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServerOptions:
    model_repository: Path = PROJECT_ROOT / "model_repository"
    http_port: int = int(os.environ.get("HTTP_PORT", 8000))
    grpc_port: int = int(os.environ.get("GRPC_PORT", 8001))
    metrics_port: int = int(os.environ.get("METRICS_PORT", 8002))
    extra_args: list[str] = field(default_factory=list)

    @classmethod
    def on_free_ports(cls, model_repository: Path) -> ServerOptions:
        """Ports the OS has free now, for servers started by tests and benchmarks."""
        ports = []
        for _ in range(3):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                ports.append(probe.getsockname()[1])
        return cls(model_repository, *ports)


def model_repository_with(
    target: Path,
    parameters: dict[str, str],
    source: Path | None = None,
    max_queue_size: int | None = None,
    extra_models: Sequence[Path] = (),
) -> Path:
    """A copy of the model repository at `target` with some csm_stream parameters (and its queue
    bound) replaced: how tests and benchmarks point the server at their own weights and slots.
    `extra_models` are model directories copied in beside the repository's own (test stand-ins
    such as tests/model_repository/fake_llm)."""
    shutil.copytree(source or ServerOptions().model_repository, target)
    for model in extra_models:
        shutil.copytree(model, target / model.name)
    config = target / "csm_stream" / "config.pbtxt"
    text = config.read_text()
    replacements = {f'{{ key: "{key}", value: {{ string_value: "': value for key, value in parameters.items()}
    if max_queue_size is not None:
        replacements["max_queue_size: "] = str(max_queue_size)
    for marker, value in replacements.items():
        if marker not in text:
            raise KeyError(f"csm_stream/config.pbtxt has no {marker!r}")
        start = text.index(marker) + len(marker)
        end = start + next(i for i, char in enumerate(text[start:]) if char in '" }')
        text = text[:start] + value + text[end:]
    config.write_text(text)
    return target


def _bundled_triton() -> tuple[Path, Path, dict[str, str]]:
    """(tritonserver binary, backend directory, environment) from the nvidia-pytriton wheel."""
    import pytriton

    root = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton has no python-backend stub for Python {version}")
    # Triton looks for backends/python/{libtriton_python.so, stub, utils}; the wheel keeps the
    # stubs apart, one per Python version, so assemble the directory once.
    backends = Path(tempfile.gettempdir()) / f"csm-triton-backends-py{version}"
    python_backend = backends / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for source in (*(root / "backends" / "python").iterdir(), stub):
        target = python_backend / source.name
        if not target.exists():
            shutil.copy2(source, target)
    site_packages = Path(pytriton.__file__).parents[1]
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libraries = [sysconfig.get_config_var("LIBDIR"), str(site_packages / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(part for part in libraries if part)
    return root / "bin" / "tritonserver", backends, env


def command(options: ServerOptions) -> tuple[list[str], dict[str, str]]:
    args = [
        f"--model-repository={options.model_repository}",
        f"--http-port={options.http_port}",
        f"--grpc-port={options.grpc_port}",
        f"--metrics-port={options.metrics_port}",
        *options.extra_args,
    ]
    installed = shutil.which("tritonserver")
    if installed:
        return [installed, *args], dict(os.environ)
    binary, backends, env = _bundled_triton()
    return [str(binary), f"--backend-directory={backends}", *args], env


class TritonServer:
    """A tritonserver child process; `start()` returns once the server is ready."""

    def __init__(self, options: ServerOptions, log_file: Path | None = None) -> None:
        self.options = options
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"localhost:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.options.grpc_port}"

    def start(self, timeout_s: float = 300.0) -> TritonServer:
        argv, env = command(self.options)
        output = open(self.log_file, "w") if self.log_file else None  # noqa: SIM115 (lives as long as the process)
        self.process = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT if output else None)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} before it was ready (log: {self.log_file})")
            if self.ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"tritonserver was not ready within {timeout_s:.0f} s (log: {self.log_file})")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # tritonserver unloads its models and exits
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ServerOptions()
    parser.add_argument("--model-repository", type=Path, default=defaults.model_repository)
    parser.add_argument("--http-port", type=int, default=defaults.http_port, help="or HTTP_PORT")
    parser.add_argument("--grpc-port", type=int, default=defaults.grpc_port, help="or GRPC_PORT")
    parser.add_argument("--metrics-port", type=int, default=defaults.metrics_port, help="or METRICS_PORT")
    args, extra = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = ServerOptions(args.model_repository.resolve(), args.http_port, args.grpc_port, args.metrics_port, extra)
    server = TritonServer(options)
    signal.signal(signal.SIGINT, lambda *_: None)  # Ctrl-C reaches tritonserver too; wait for it to exit
    server.start()
    logger.info(
        "tritonserver ready: HTTP localhost:%d, gRPC localhost:%d, metrics localhost:%d (Ctrl-C stops it)",
        options.http_port,
        options.grpc_port,
        options.metrics_port,
    )
    sys.exit(server.process.wait())


if __name__ == "__main__":
    main()
