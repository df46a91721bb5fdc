"""Client for CSM-1B served by Triton: `CSMClient` / `AsyncCSMClient` (numpy), `RemoteGenerator`
(the design document's Generator over the network) and the `csm-say` command.

Needs only numpy, tritonclient and soundfile (its own distribution, csm-client); not the model stack.
`contract` holds what the client, the gateway and the server share: the tensors, their defaults and
bounds, the audio's facts. `turns` signs and opens turn references (the gateway's and csm_stream's).
"""

from .client import AsyncCSMClient, CSMClient, CSMError, TurnChunk, build_inputs, request_arrays
from .contract import SAMPLE_RATE
from .remote import RemoteGenerator
from .segment import Segment, TurnRef
from .turns import TurnRecord, open_turn, sign_turn

__all__ = [
    "SAMPLE_RATE",
    "AsyncCSMClient",
    "CSMClient",
    "CSMError",
    "RemoteGenerator",
    "Segment",
    "TurnChunk",
    "TurnRecord",
    "TurnRef",
    "build_inputs",
    "open_turn",
    "request_arrays",
    "sign_turn",
]
