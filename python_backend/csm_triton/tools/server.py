"""Run a real tritonserver on a model repository, with or without NVIDIA's container.

Inside NVIDIA's container `tritonserver` is on the PATH and used as it is. Elsewhere the binary,
python backend and stubs bundled in the `nvidia-pytriton` wheel are used: the stub must match the
running Python and find this venv's interpreter and libpython (ENVIRONMENT.md).

Every server started here (`make serve`, the Docker image, Kubernetes, the tests' fixture) gets the
same flags: the admin APIs behind a key header, and explicit model control with the repository's
models loaded at startup (`startup_models`), unless the caller passes its own --model-control-mode. The key is
$CSM_ADMIN_KEY, or a new random one written to --admin-key-file (mode 0600).

  python -m csm_triton.tools.server [--model-repository DIR] [--http-port N] [--grpc-port N] [--metrics-port N]
                              [--admin-key-file FILE] [tritonserver arguments ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import secrets
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

PROJECT_ROOT = Path(__file__).resolve().parents[3]  # python_backend/csm_triton/tools/server.py

ADMIN_KEY_ENV = "CSM_ADMIN_KEY"
DEFAULT_ADMIN_KEY_FILE = PROJECT_ROOT / "build" / "admin-key"
# The header that carries the admin key, per protocol: Triton's gRPC server looks for a restricted
# protocol's key under its own prefix.
ADMIN_HEADERS = {"http": "csm-admin-key", "grpc": "triton-grpc-protocol-csm-admin-key"}
# Behind the key: loading and unloading models, registering shared-memory regions (a client could
# have the server map any region of this host), statistics, tracing and log settings, and model
# configs (they show the server's paths and parameters: model_dir, EXECUTION_ENV_PATH). Neither
# csm_client nor tritonclient's inference calls read a config. Open: health (the probes),
# inference, and metadata, the KServe v2 protocol's description of the server and of each model's
# tensors (the README's tensor table), which generic v2 clients read to build their requests.
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
# Explicit mode lets a model load or unload another (pb_utils.load_model) and the repository API
# load and unload models without a restart; --load-model names those loaded at startup (startup_models).
MODEL_CONTROL_FLAG = "--model-control-mode"
LOAD_MODEL_FLAG = "--load-model"
# A model's text_model parameter in its config.pbtxt (text_stream_tts: the LLM it speaks for).
TEXT_MODEL_PARAMETER = re.compile(r'key:\s*"text_model",\s*value:\s*\{\s*string_value:\s*"([^"]*)"')
# Printable characters that survive Triton's flag parsing and an HTTP header or gRPC metadata value;
# `openssl rand -hex 32` and base64 keys fit.
ADMIN_KEY_PATTERN = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")


def new_admin_key() -> str:
    return secrets.token_urlsafe(32)


def check_admin_key(key: str) -> str:
    if not ADMIN_KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"{ADMIN_KEY_ENV}: must be 16 or more of the characters A-Z a-z 0-9 . _ ~ + / = - (`openssl rand -hex 32` makes one)"
        )
    return key


def admin_headers(key: str, protocol: str) -> dict[str, str]:
    """The `headers=` that open the restricted APIs to a tritonclient call over `protocol` ("http" or "grpc")."""
    return {ADMIN_HEADERS[protocol]: key}


@dataclass
class ServerOptions:
    model_repository: Path = PROJECT_ROOT / "model_repository"
    http_port: int = int(os.environ.get("HTTP_PORT", 8000))
    grpc_port: int = int(os.environ.get("GRPC_PORT", 8001))
    metrics_port: int = int(os.environ.get("METRICS_PORT", 8002))
    extra_args: list[str] = field(default_factory=list)
    admin_key: str = field(default_factory=new_admin_key)

    @classmethod
    def on_free_ports(cls, model_repository: Path) -> ServerOptions:
        """Ports the OS has free now, for servers started by tests and benchmarks."""
        return cls(model_repository, *free_ports(3))


def free_ports(count: int) -> list[int]:
    """`count` different ports the OS has free now: each socket is held until all are bound, or the
    OS may hand out one port twice (seen: tritonserver refusing the same port for gRPC and metrics)."""
    with contextlib.ExitStack() as sockets:
        probes = [sockets.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def set_parameters(config: Path, values: dict[str, str]) -> None:
    """Replace parameter values in a config.pbtxt (JSON string quoting is pbtxt's too): how tests
    and benchmarks set a model's parameters in their copy of the repository."""
    text = config.read_text()
    for key, value in values.items():
        text, count = re.subn(rf'(\{{ key: "{key}", value: \{{ string_value: )"(?:[^"\\]|\\.)*"', rf"\g<1>{json.dumps(value)}", text)
        if count != 1:
            raise KeyError(f"{config} has no parameter {key}")
    config.write_text(text)


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
    set_parameters(config, parameters)
    if max_queue_size is not None:
        text, count = re.subn(r"max_queue_size: \d+", f"max_queue_size: {max_queue_size}", config.read_text())
        if count != 1:
            raise KeyError(f"{config} has no max_queue_size")
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


def tritonserver_args(options: ServerOptions) -> list[str]:
    """Every tritonserver flag but the backend directory: the one place they are built."""
    restriction = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADERS['http']}={check_admin_key(options.admin_key)}"
    args = [
        f"--model-repository={options.model_repository}",
        f"--http-port={options.http_port}",
        f"--grpc-port={options.grpc_port}",
        f"--metrics-port={options.metrics_port}",
        f"--http-restricted-api={restriction}",
        f"--grpc-restricted-protocol={restriction}",  # the key's name gets the gRPC prefix of ADMIN_HEADERS
    ]
    if not any(arg.startswith(MODEL_CONTROL_FLAG) for arg in options.extra_args):
        args.append(f"{MODEL_CONTROL_FLAG}=explicit")
        if not any(arg.startswith(LOAD_MODEL_FLAG) for arg in options.extra_args):
            repositories = [options.model_repository, *(Path(value) for value in _flag_values(options.extra_args, "--model-repository"))]
            if all(repository.is_dir() for repository in repositories):
                args.extend(f"{LOAD_MODEL_FLAG}={model}" for model in startup_models(repositories))
            else:  # not here (flags for a container's paths), or missing: tritonserver finds or reports it
                args.append(f"{LOAD_MODEL_FLAG}=*")
    return [*args, *options.extra_args]


def startup_models(repositories: Sequence[Path]) -> list[str]:
    """Every model of the repositories, but those that could only fail: a model whose config
    names a `text_model` (text_stream_tts) the repositories do not hold would report ready and
    refuse every request, so it is left unloaded (loaded with the repository API once its text
    model is there, or at start beside it)."""
    configs = {folder.name: folder / "config.pbtxt" for repository in repositories for folder in sorted(repository.iterdir())}
    configs = {name: config for name, config in configs.items() if config.is_file()}
    startable = []
    for name, config in configs.items():
        text_model = TEXT_MODEL_PARAMETER.search(config.read_text())
        if text_model is not None and text_model.group(1) not in configs:
            logger.info("%s is not loaded: its text_model %r is not in the model repository", name, text_model.group(1))
            continue
        startable.append(name)
    return startable


def _flag_values(args: Sequence[str], name: str) -> list[str]:
    """The values of `--name=value` and `--name value` in `args`."""
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"{name}=")]
    return values + [args[index + 1] for index, arg in enumerate(args[:-1]) if arg == name]


def command(options: ServerOptions) -> tuple[list[str], dict[str, str]]:
    args = tritonserver_args(options)
    installed = shutil.which("tritonserver")
    if installed:
        return [installed, *args], dict(os.environ)
    binary, backends, env = _bundled_triton()
    return [str(binary), f"--backend-directory={backends}", *args], env


class ServerExitedError(RuntimeError):
    """tritonserver exited before it was ready."""


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

    def admin_headers(self, protocol: str) -> dict[str, str]:
        return admin_headers(self.options.admin_key, protocol)

    def start(self, timeout_s: float | None = 300.0) -> TritonServer:
        """`timeout_s` None: wait as long as the models take to load."""
        argv, env = command(self.options)
        output = open(self.log_file, "w") if self.log_file else None  # noqa: SIM115 (lives as long as the process)
        self.process = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT if output else None)
        deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise ServerExitedError(f"tritonserver exited with code {code} before it was ready (log: {self.log_file})")
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

    def stop(self, timeout_s: float = 60.0, linger_s: float = 5.0) -> None:
        """Ctrl-C: tritonserver waits for the requests in flight (its exit timeout), unloads its
        models and exits. Once its models' processes (the python backend's stubs) have all exited,
        it has `linger_s` more to exit before it is killed, with nothing left to lose: in full test
        runs, the voice tests' server stayed 30 s after its last model had unloaded (2 s when they
        ran alone; why is not known)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        deadline, unloaded = time.monotonic() + timeout_s, math.inf
        while self.process.poll() is None and time.monotonic() < min(deadline, unloaded + linger_s):
            if unloaded == math.inf and not _children(self.process.pid):
                unloaded = time.monotonic()
            time.sleep(0.1)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _children(pid: int) -> list[int]:
    """The process's child processes, started from any of its threads (Linux's /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the thread, or the process, has ended
            pass
    return children


def write_new_key(key_file: Path) -> str:
    """A new random key, written to `key_file`, which only this user can read (mode 0600)."""
    key = new_admin_key()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.unlink(missing_ok=True)  # the mode below applies to a new file only
    with open(os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(key)
    return key


def admin_key(key_file: Path) -> str:
    """$CSM_ADMIN_KEY, or a new random key (at every start) written to `key_file`, for the
    admin's tools to read it from."""
    key = os.environ.get(ADMIN_KEY_ENV)
    if key is not None:
        return check_admin_key(key)
    key = write_new_key(key_file)
    logger.info(
        "%s is not set: the admin key (header %s over HTTP, %s over gRPC) is in %s",
        ADMIN_KEY_ENV,
        ADMIN_HEADERS["http"],
        ADMIN_HEADERS["grpc"],
        key_file,
    )
    return key


def parse_command_line(argv: Sequence[str] | None = None) -> tuple[ServerOptions, Path]:
    """(the server's options, where a generated admin key goes); arguments not known here are
    passed on to tritonserver. The options' admin key is a random one until `admin_key` sets it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ServerOptions()
    parser.add_argument("--model-repository", type=Path, default=defaults.model_repository)
    parser.add_argument("--http-port", type=int, default=defaults.http_port, help="or HTTP_PORT")
    parser.add_argument("--grpc-port", type=int, default=defaults.grpc_port, help="or GRPC_PORT")
    parser.add_argument("--metrics-port", type=int, default=defaults.metrics_port, help="or METRICS_PORT")
    key_file_help = f"where a new admin key is written when {ADMIN_KEY_ENV} is unset"
    parser.add_argument("--admin-key-file", type=Path, default=DEFAULT_ADMIN_KEY_FILE, help=key_file_help)
    args, extra = parser.parse_known_args(argv)
    options = ServerOptions(args.model_repository.resolve(), args.http_port, args.grpc_port, args.metrics_port, extra)
    return options, args.admin_key_file


def serve(options: ServerOptions) -> int:
    """Runs tritonserver until it exits and returns its exit status (128 + the signal that killed
    it). SIGTERM and SIGINT are passed on, so that it stops taking requests, drains those in flight
    and unloads its models: in a container this process is PID 1 and the only one to get them (Ctrl-C
    in a terminal reaches tritonserver as well; a second signal changes nothing for it)."""
    server = TritonServer(options)

    def pass_on(signum: int, _frame: object) -> None:
        if server.process is None:
            raise SystemExit(128 + signum)
        server.process.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, pass_on)
    try:
        server.start(timeout_s=None)
    except ServerExitedError as error:  # tritonserver's own log above says why
        logger.error("%s", error)
    else:
        logger.info(
            "tritonserver ready: HTTP localhost:%d, gRPC localhost:%d, metrics localhost:%d (Ctrl-C stops it)",
            options.http_port,
            options.grpc_port,
            options.metrics_port,
        )
    code = server.process.wait()
    return code if code >= 0 else 128 - code


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options, key_file = parse_command_line()
    try:
        options.admin_key = admin_key(key_file)
    except ValueError as error:
        sys.exit(str(error))
    sys.exit(serve(options))


if __name__ == "__main__":
    main()
