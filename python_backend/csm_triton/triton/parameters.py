"""A Triton model's config.pbtxt `parameters`, typed by the fields of its settings dataclass.

Torch-free, for the models that hold no weights (csm, text_stream_tts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

CONVERSIONS = {"int": int, "float": float, "str": str}


def typed_parameters(settings: type, parameters: dict[str, dict[str, str]], positive: Iterable[str] = ()) -> dict[str, Any]:
    """The values of `parameters` (Triton gives them as {"key": {"string_value": "..."}}) converted
    to the types of `settings`' fields: int, float, bool ("true" or "false") and str; a field of
    another type keeps its text, for the caller to read. Raises ValueError naming the key for an
    unknown key, a value that does not convert, or one of `positive` that is not > 0."""
    fields = {field.name: str(field.type) for field in dataclasses.fields(settings)}
    values: dict[str, Any] = {}
    for key, value in parameters.items():
        if key not in fields:
            raise ValueError(f"config.pbtxt parameters: unknown key {key!r} (known: {sorted(fields)})")
        text = value["string_value"]
        kind = fields[key]
        try:
            if kind == "bool":
                if text not in ("true", "false"):
                    raise ValueError("must be true or false")
                values[key] = text == "true"
            else:
                values[key] = CONVERSIONS.get(kind, str)(text)
        except ValueError as error:
            raise ValueError(f"config.pbtxt parameters: {key}: {error} (got {text!r})") from None
    for key in positive:
        if key in values and not values[key] > 0:
            raise ValueError(f"config.pbtxt parameters: {key} must be > 0, got {values[key]!r}")
    return values
