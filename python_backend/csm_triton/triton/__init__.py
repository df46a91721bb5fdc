"""The Triton side: everything the python-backend models of model_repository/ run, whose
`model.py` files only import their class from here.

- `csm`, `unary_front`, `stream_watch`: the unary "csm" model over csm_stream, and its watch.
- `csm_stream`, `serving`, `stream_metrics`: the streaming model's stub: requests read and checked
  from its input tensors, its metrics.
- `protocol`, `worker_client`, `engine_worker`: csm_stream's engine process: the messages between
  stub and process, the stub's client of it, and the process's own side; `voices`: the voice
  library the engine process loads.
- `text_stream_tts`, `sentences`: an LLM's answer spoken sentence by sentence.
- `bls`, `control`, `parameters`, `orphan`: calls from one model to another, their control
  requests, config.pbtxt parameters read into settings, a stub that exits with its server.

Torch-free but for `engine_worker` (the engine process), so that the stubs hold no torch. This file
imports nothing.
"""
