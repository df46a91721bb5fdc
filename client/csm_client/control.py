"""The control requests csm_stream answers at once, and what their answers mean: shared by the fronts
inside Triton (csm_triton/triton/bls.py) and by clients outside it, so it lives in the light client's
distribution and imports neither torch nor the python backend's utilities.

A control request is an ordinary csm_stream request (TEXT and SPEAKER, which it ignores) whose
parameters ask for something other than speech:

- FORWARD_ID (a uuid4 hex) on a request to generate: csm_stream remembers the stream of each id
  while it runs, so that a CANCEL can name it.
- CANCEL (a forward id): stop that stream. Answered at once with one empty final response.
- PROBE (true): answered at once with one empty final response while csm_stream can serve, or with
  an error saying why it cannot.

Why callers PROBE: in python backend 24.10 (tritonserver 2.51) a decoupled request's response
factory is known, once execute() has returned, only by its address inside the stub process (the
request's ResponseSender); the server keeps no list of them. When csm_stream's stub dies (kill -9,
the OOM killer), nothing in tritonserver can send the final response of the streams it had, and
neither an unload nor a reload does: those streams stay open and silent for good. So a caller
waiting for csm_stream's next response asks, after `SILENCE_PROBE_S` of silence, whether
csm_stream's process still lives; the answer `stream_model_gone` recognises means its stream is
lost. The csm front's watch (csm_triton/triton/stream_watch.py) unloads and loads csm_stream after such a death,
and a caller probing at least once in that window sees the model unloaded too.
"""

from __future__ import annotations

import re

FORWARD_ID = "csm_forward_id"
CANCEL = "csm_cancel"
PROBE = "csm_probe"

# How long a caller waits for csm_stream's next response before it PROBEs; shorter than a reload
# of csm_stream takes (its engine starts in seconds at the least), so that a probe sees the unload.
SILENCE_PROBE_S = 2.0

# The python backend's answer to every request for a model whose stub process has died.
STUB_DEAD = re.compile(r"Stub process '[^']*' is not healthy")
# Triton's answer for a model that is not loaded (unloaded, or being loaded again).
NOT_LOADED = re.compile(r"Request for unknown model: '[^']*' (has no available versions|is not found)|is not ready")


def stream_model_gone(answer: str | None) -> bool:
    """Whether a PROBE's answer (None: csm_stream answered; else the error) means that the streams
    sent to csm_stream before it are lost: its stub has died, or the model has been unloaded since.
    csm_stream's own refusals ("csm_stream cannot serve: ...") do not: a stub that lives ends its
    streams itself."""
    return answer is not None and bool(STUB_DEAD.search(answer) or NOT_LOADED.search(answer))
