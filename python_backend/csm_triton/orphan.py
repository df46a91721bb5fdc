"""What each python-backend model of this project does when tritonserver dies without unloading it
(killed, crashed): exit. The python backend leaves its stub processes running then; a stub left
over keeps its threads going (a csm watch once probed and "reloaded" a server that was gone for
40 minutes, writing into the log of the next one), csm_stream's engine keeps holding the GPU, and
none of them will ever be asked for anything again. Imports no torch.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

CHECK_S = 0.5


def exit_with_server(model: str) -> threading.Thread:
    """Start a thread that exits this process once tritonserver, its parent, is gone."""
    server = os.getppid()

    def watch() -> None:
        while os.getppid() == server:
            threading.Event().wait(CHECK_S)
        logger.error("tritonserver (pid %d) is gone; %s's process exits", server, model)
        os._exit(1)

    thread = threading.Thread(target=watch, name="csm-orphan-watch", daemon=True)
    thread.start()
    return thread
