"""What runs without torch imports none of it: the fronts (csm, text_stream_tts) as their stubs load
them, the request model with csm_stream's serving side, and the gateway. Each loads in a fresh
interpreter in which importing torch, torchaudio, moshi or torchtune fails and is recorded, so a
guarded attempt shows as plainly as an import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_front_units import BACKEND_UTILS, FRONT_MODULES

pytestmark = pytest.mark.unit

HEAVY = ["torch", "torchaudio", "moshi", "torchtune"]
SCRIPT = """
import importlib, importlib.abc, json, sys
paths, modules, heavy = json.loads(sys.argv[1])
tried = []

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in heavy:
            tried.append(name)
            raise ImportError(f"{name} is refused here")
        return None

sys.meta_path.insert(0, Refuse())
sys.path[:0] = paths
for name in modules:
    importlib.import_module(name)
print(json.dumps(sorted(set(tried))))
"""


@pytest.mark.parametrize(
    ("paths", "modules"),
    [
        ([str(BACKEND_UTILS)], sorted(FRONT_MODULES)),
        ([], ["csm_triton.triton.serving", "csm_triton.request"]),
        ([], ["gateway.app", "gateway.voices", "csm_triton.tools.serve"]),
    ],
    ids=["fronts", "request and serving", "gateway"],
)
def test_imports_no_torch(paths: list[str], modules: list[str]) -> None:
    arguments = json.dumps([paths, modules, HEAVY])
    result = subprocess.run([sys.executable, "-c", SCRIPT, arguments], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(result.stdout) == []
