"""Client for CSM-1B served by Triton: `CSMClient` / `AsyncCSMClient` (numpy), `RemoteGenerator`
(the design document's Generator over the network) and the `csm-say` command.

Needs only numpy and tritonclient; not the model stack.
"""

from .client import AsyncCSMClient, CSMClient, CSMError, build_inputs, request_arrays
from .remote import RemoteGenerator
from .segment import SAMPLE_RATE, Segment

__all__ = ["SAMPLE_RATE", "AsyncCSMClient", "CSMClient", "CSMError", "RemoteGenerator", "Segment", "build_inputs", "request_arrays"]
