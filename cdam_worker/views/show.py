"""The figure of ``cdam show``: which stored map a ``--target`` names for an image, and its picture."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
from PIL import Image

from cdam_worker.reading import Run, RunError
from cdam_worker.views.render import figure
from cdam_worker.views.tiles import TileRenderer

ATTENTION = "attention"


def target_map(run: Run, record: dict, target: str | None) -> tuple[str, str]:
    """(map name for TileRenderer, what it shows) of ``target`` for the image whose metadata row is ``record``.

    ``target`` is a class name or index, a concept name, ``attention``, or None for the predicted class.
    RunError (one line) when the image has no stored map of it.
    """
    if target == ATTENTION:
        return "att", f"attention (mean of {run.array('attention').shape[1]} heads, above its minimum)"
    names = list(record["target_names"])
    stored = ", ".join(names)
    if target is not None and target in names and record["targets"][names.index(target)] < 0:
        return f"s{names.index(target)}", f"concept {target}"
    class_index = record["pred"] if target is None else run.class_index(target)
    if class_index not in record["targets"]:
        what = "its predicted class " if target is None else ""
        raise RunError(f"key {record['key']!r}: no stored map of {what}{run.class_names[class_index]!r} (its targets: {stored}); pick one with --target")
    return f"s{list(record['targets']).index(class_index)}", f"class {run.class_names[class_index]} ({class_index})"


def show_figure(run: Run, key: str, target: str | None, size: int) -> tuple[Image.Image, str]:
    """The figure of ``key``'s map of ``target`` and a one-line description of it."""
    table = run.metadata.to_table(filter=ds.field("key") == key)
    if table.num_rows == 0:
        raise RunError(f"key {key!r} is not an explained image of {run.url}")
    record = table.slice(0, 1).to_pylist()[0]
    map_name, described = target_map(run, record, target)
    tiles = TileRenderer(run)
    try:
        values = tiles.map_values(key, map_name)
        if not np.isfinite(values).any():
            raise RunError(f"key {key!r}: its maps were not written (the Zarr row reads as fill values, NaN); see `cdam verify {run.url}`")
        image = tiles.model_view_image(key, size)
        if image is None:
            raise RunError(tiles.unreadable.get(key, f"image of {key!r} cannot be read"))
    finally:
        tiles.close()
    title = described.split(" (")[0]
    scale = float(np.nanmax(np.abs(values)))
    subtitle = f"{key}: CDAM, red = for, blue = against (scale ±{scale:.3g})" if map_name != "att" else f"{key}: last block's CLS attention"
    return figure(image, values, title, subtitle), f"{described}, map scale ±{scale:.3g}"
