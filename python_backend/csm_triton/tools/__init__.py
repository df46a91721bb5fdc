"""Tools around the runtime: starting tritonserver (`server`: `make serve`, the image, the tests),
`make serve`'s launcher of tritonserver and the speech gateway side by side (`serve`), and packing
csm_stream's Python environment (`pack_env`). Nothing of the runtime imports them."""
