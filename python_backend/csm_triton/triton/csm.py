"""The unary "csm" model (model_repository/csm/1/model.py imports its class from here): forwards
each request to the streaming model that holds the weights (a decoupled BLS call) and answers with
its chunks joined (unary_front.py). It imports no torch and holds no weights, so unary and streaming
requests share one copy of the model and one running batch. It also keeps a watch over that
model's process (stream_watch.py)."""

from __future__ import annotations

import json
import logging

from .orphan import exit_with_server
from .stream_watch import StreamWatch
from .unary_front import Settings, UnaryFront


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.orphan_watch = exit_with_server(args["model_name"])
        model_config = json.loads(args["model_config"])
        settings = Settings.from_parameters(model_config.get("parameters", {}))
        self.front = UnaryFront(settings, [tensor["name"] for tensor in model_config["input"]])
        self.watch = StreamWatch(
            settings.stream_model,
            settings.watch_interval_s,
            settings.probe_timeout_s,
            settings.reload_tries,
            settings.reload_backoff_s,
            check_timeout_s=settings.first_audio_timeout_s,
        )

    def execute(self, requests: list) -> None:
        # One thread per request, so that a request arriving now joins the running batch instead of
        # waiting behind the requests before it (the response sender works outside execute()).
        for request in requests:
            self.front.start(request)
        return None

    def finalize(self) -> None:
        self.watch.stop()
