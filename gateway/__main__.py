"""python -m gateway [--port 8080 --triton-url localhost:8001 ...]: the gateway under uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .config import GatewayConfig
from .connections import uvicorn_config


def main() -> None:
    config = GatewayConfig.from_command_line()
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("gateway").info(
        "gateway: http://%s:%d/ (Triton gRPC %s)", "localhost" if config.host == "0.0.0.0" else config.host, config.port, config.triton_url
    )
    uvicorn.Server(uvicorn_config(create_app(config), config, timeout_graceful_shutdown=10)).run()


if __name__ == "__main__":
    main()
