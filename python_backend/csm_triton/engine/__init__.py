"""The engine: batching requests into slots (`engine`), the CUDA-graph frame step (`graphs`),
prompts (`prompt`), each stream's pacing (`pacing`, torch-free), the serving loop's generation and
audio threads (`streaming`) and the design document's Python API over them (`generator`).

It imports the model and the request contract (`csm_triton.request`), never the Triton side or the
tools. This file imports nothing, so that the torch-free `pacing` imports without torch.
"""
