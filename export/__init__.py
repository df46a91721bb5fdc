"""Stage model directories for the server: `python -m export fetch` (Sesame's CSM-1B, the Llama-3.2
tokenizer and Mimi from the Hugging Face Hub) and `python -m export tiny` (a small random model).

Call from code as `export.fetch.fetch(out, ...)` / `export.fetch.stage(out, sources)` and
`export.tiny.make_tiny(out, seed)`; the layout is described in `csm_triton.model.checkpoint`.
"""
