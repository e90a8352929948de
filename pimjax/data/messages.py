"""User-facing error text: every message pimjax.data raises is one line."""

from __future__ import annotations


def one_line(text: object) -> str:
    """`text` (a message or an exception) on one line: each run of whitespace becomes a space."""
    return " ".join(str(text).split())
