"""`make serve`: tritonserver (through `python -m csm_triton.tools.server`, every argument passed on) and
the gateway beside it in this process, on GATEWAY_PORT (8080) and the server's gRPC port.

The gateway answers at once; its /health says 503 until csm_stream is ready. Ctrl-C or SIGTERM
stops both: tritonserver drains and unloads its models, and when it exits by itself, the gateway
stops too, with tritonserver's exit status.

Creating and deleting voices takes a key: CSM_GATEWAY_VOICE_KEYS, else a new random one (at every
start) written to --voices-key-file, as csm_triton.tools.server does the admin key;
CSM_GATEWAY_OPEN_VOICES=true lets anyone who may speak create and delete voices instead.

  python -m csm_triton.tools.serve [--gateway-port N] [--voices-key-file FILE] [csm_triton.tools.server arguments ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import uvicorn

from gateway.app import create_app
from gateway.config import ENV_PREFIX, GatewayConfig
from gateway.connections import uvicorn_config

from .server import PROJECT_ROOT, parse_command_line, write_new_key

logger = logging.getLogger("gateway")
DEFAULT_VOICES_KEY_FILE = PROJECT_ROOT / "build" / "gateway-voices-key"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway-port", type=int, default=None, help="the gateway's HTTP port (or GATEWAY_PORT, default 8080)")
    key_file_help = f"where a new voices key is written when neither {ENV_PREFIX}VOICE_KEYS nor {ENV_PREFIX}OPEN_VOICES is set"
    parser.add_argument("--voices-key-file", type=Path, default=DEFAULT_VOICES_KEY_FILE, help=key_file_help)
    args, server_args = parser.parse_known_args(argv)
    options, _ = parse_command_line(server_args)  # the same flags tritonserver will get, for its gRPC port
    config = GatewayConfig.from_env(
        port=args.gateway_port, triton_url=os.environ.get("CSM_GATEWAY_TRITON_URL", f"localhost:{options.grpc_port}")
    )
    if not (config.voice_keys or config.open_voices):
        config = dataclasses.replace(config, voice_keys=(write_new_key(args.voices_key_file),))
        print(
            f"gateway: {ENV_PREFIX}VOICE_KEYS is not set: creating and deleting voices takes the key in {args.voices_key_file} "
            f"(Authorization: Bearer <key>; {ENV_PREFIX}OPEN_VOICES=true opens them to all)",
            flush=True,
        )
    triton = subprocess.Popen([sys.executable, "-m", "csm_triton.tools.server", *server_args])
    gateway = uvicorn.Server(uvicorn_config(create_app(config), config))

    def watch() -> None:
        triton.wait()
        gateway.should_exit = True

    def stop_triton(_signum: int, _frame: object) -> None:
        if triton.poll() is None:
            triton.send_signal(signal.SIGINT)  # csm_triton.tools.server passes it on; tritonserver drains and unloads

    # uvicorn handles SIGTERM and SIGINT while it runs, then raises the signal again to the handlers
    # it found: these, so that this process waits for tritonserver and exits with its status.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_triton)
    threading.Thread(target=watch, daemon=True).start()
    print(
        f"gateway: http://localhost:{config.port}/  (the page; OpenAI base_url http://localhost:{config.port}/v1; "
        f"csm_stream over gRPC at {config.triton_url})",
        flush=True,
    )
    try:
        gateway.run()  # returns on Ctrl-C / SIGTERM, or once tritonserver has exited
    finally:
        stop_triton(signal.SIGINT, None)
        code = triton.wait()
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
