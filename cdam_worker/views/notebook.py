"""A run in Jupyter: the HTML summary behind ``Run._repr_html_`` (``Run.show`` draws ``cdam show``'s picture)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdam_worker.reading import Run

CLASSES_LISTED = 8  # class names written out before "... and N more"


def summary_html(run: Run) -> str:
    """A table of what the run is (model, path, targets, concepts, variant) and how far it got (images, shards, errors)."""
    attrs = run.attrs
    complete = sum(1 for shard in run.shards if shard.complete)
    names = run.class_names
    listed = ", ".join(names[:CLASSES_LISTED]) + (
        f" ... and {len(names) - CLASSES_LISTED} more" if len(names) > CLASSES_LISTED else ""
    )
    concepts = ", ".join(f"{c['name']} ({c.get('similarity', 'dot')})" for c in attrs.get("concepts", [])) or "none"
    variant = attrs.get("variant", {})
    _channels, height, width = attrs.get("input_size", ["?", "?", "?"])
    rows: list[tuple[str, Any]] = [
        ("model", f"{attrs.get('model', {}).get('name')} ({attrs.get('method', '?').replace('_', ' ')})"),
        ("classes", f"{len(names)}: {listed}" if names else "none (a feature extractor: concepts only)"),
        ("targets", f"{attrs.get('targets')}, {run.n_targets} map(s) per image"),
        ("concepts", concepts),
        ("variant", ", ".join(f"{k} {v}" for k, v in variant.items()) or "vanilla"),
        (
            "maps",
            f"{run.grid[0]}x{run.grid[1]} tokens of {height}x{width} px, {attrs.get('maps_dtype')}{', basis stored' if run.has_basis else ''}",
        ),
        ("images", f"{run.metadata.count_rows()} explained, {run.errors.num_rows} in errors/"),
        (
            "shards",
            f"{complete} of {len(run.shards)} complete" + ("" if run.complete else " (the job has not finished)"),
        ),
    ]
    body = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
        for k, v in rows
    )
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in run.skipped)
    return (
        f"<div class='cdam-run'><b>cdam run</b> <code>{html.escape(run.url)}</code>"
        f"<table>{body}</table>{f'<ul>{notes}</ul>' if notes else ''}"
        "<small>run.show(key, target) draws a map; run.metadata, run.maps, run.sql() read the rest</small></div>"
    )
