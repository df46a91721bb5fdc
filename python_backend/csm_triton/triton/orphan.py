"""What each python-backend model of this project does when tritonserver dies without unloading it
(killed, crashed): exit. The python backend leaves its stub processes running then; a stub left
over keeps its threads going (a csm watch once probed and "reloaded" a server that was gone for
40 minutes, writing into the log of the next one), csm_stream's engine keeps holding the GPU, and
none of them will ever be asked for anything again.

The watch is a shell of its own, not a thread of the stub: the python backend's calls into the
server (a metric's `set`, a response's `send`) wait for the server's answer holding the GIL, so a
stub whose server died during one never runs Python again (seen: csm_stream's metrics thread in
`Metric.set`, every other thread waiting for the GIL). Imports no torch.
"""

from __future__ import annotations

import os
import subprocess

CHECK_S = 0.5
# $1: the stub, this shell's parent; $2: tritonserver, the stub's parent; $3: the model. Either
# parent changing means it is gone (a process whose parent dies is given another): the stub's
# ends the watch, tritonserver's ends the stub (its engine process follows, engine_worker.py). A
# parent that cannot be read (a failed fork under load) changes nothing.
WATCH = f"""
parent() {{ sed -n 's/^PPid:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null; }}
while :; do
  sleep {CHECK_S}
  own=$(parent $$) stub=$(parent $1)
  if [ -n "$own" ] && [ "$own" != "$1" ]; then exit 0; fi
  if [ -n "$stub" ] && [ "$stub" != "$2" ]; then break; fi
done
echo "csm_triton.triton.orphan: tritonserver (pid $2) is gone; killing $3's process ($1)" >&2
kill -9 "$1"
"""


def exit_with_server(model: str) -> subprocess.Popen:
    """Start the shell that kills this process once tritonserver, its parent, is gone."""
    return subprocess.Popen(
        ["/bin/sh", "-c", WATCH, "csm-orphan-watch", str(os.getpid()), str(os.getppid()), model], stdin=subprocess.DEVNULL
    )
