"""Rendering untrusted values into messages (no dependencies: the fetch path imports it)."""

from __future__ import annotations

from typing import Any


def show(value: Any, limit: int = 40) -> str:
    """Render an untrusted value for a message: short, and never a 5000-digit integer.

    (``repr`` of a huge ``int`` raises ValueError past Python's digit limit, also inside a
    list or a map; ``repr`` of a deeply nested one raises RecursionError.)
    """
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<integer of {value.bit_length()} bits>"
    try:
        text = repr(value) if not isinstance(value, int) else str(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
