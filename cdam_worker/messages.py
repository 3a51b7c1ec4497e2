"""Error text for users: one line, whitespace collapsed, cut to a length."""

from __future__ import annotations


def one_line(error: BaseException, limit: int = 300) -> str:
    """``error``'s message on one line (at most ``limit`` characters), or its type's name when it has none."""
    return " ".join(str(error).split())[:limit] or type(error).__name__
