"""Class names and indices as users type them (``zebra``, ``7``), without importing torch: the reading
commands resolve them too."""

from __future__ import annotations

import difflib


def resolve_class(name_or_index: str | int, class_names: list[str]) -> int:
    """Class index of an index (int or digit string) or an exact (case-insensitive) class name."""
    if isinstance(name_or_index, int) or str(name_or_index).strip().lstrip("-").isdigit():
        index = int(name_or_index)
        if not 0 <= index < len(class_names):
            raise ValueError(
                f"class index {index} is out of range: the model has {len(class_names)} classes (0..{len(class_names) - 1})"
            )
        return index
    wanted = str(name_or_index).strip().lower()
    for index, name in enumerate(class_names):
        if name.lower() == wanted or wanted in (part.strip().lower() for part in name.split(",")):
            return index
    close = difflib.get_close_matches(wanted, [n.lower() for n in class_names], n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown class name {name_or_index!r}{hint}")
