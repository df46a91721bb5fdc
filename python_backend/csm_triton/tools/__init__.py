"""Tools around the runtime: starting tritonserver (`server`: `make serve`, the image, the tests)
and packing csm_stream's Python environment (`pack_env`). Nothing of the runtime imports them."""
