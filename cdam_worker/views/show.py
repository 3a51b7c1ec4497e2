"""The figure of ``cdam show``: which stored map a ``--target`` names for an image, and its picture."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
from PIL import Image

from cdam_worker.reading import Run, RunError
from cdam_worker.views.render import figure
from cdam_worker.views.tiles import TileRenderer
from schemas import DERIVED_GROUP

ATTENTION = "attention"


def target_map(run: Run, record: dict, target: str | None) -> tuple[str, str]:
    """(map name for TileRenderer, what it shows) of ``target`` for the image whose metadata row is ``record``.

    ``target`` is a class name or index, a concept name, ``attention``, or None for the predicted class.
    RunError (one line) when the image has no stored map of it (see :func:`derived_slot` for derived maps).
    """
    if target == ATTENTION:
        return "att", f"attention (mean of {run.array('attention').shape[1]} heads, above its minimum)"
    names = list(record["target_names"])
    stored = ", ".join(names)
    if target is not None and target in names and record["targets"][names.index(target)] < 0:
        return f"s{names.index(target)}", f"concept {target}"
    try:
        class_index = record["pred"] if target is None else run.class_index(target)
    except RunError as error:
        derived = ", ".join(run.derived_names()) or "none"
        raise RunError(
            f"{error} (nor a concept of key {record['key']!r}: its targets are {stored}; derived maps: {derived})"
        ) from None
    if class_index not in record["targets"]:
        what = "its predicted class " if target is None else ""
        raise RunError(
            f"key {record['key']!r}: no stored map of {what}{run.class_names[class_index]!r} (its targets: {stored}); pick one with --target"
        )
    return f"s{list(record['targets']).index(class_index)}", f"class {run.class_names[class_index]} ({class_index})"


def derived_slot(run: Run, key: str, target: str) -> tuple[str, int, str] | None:
    """(derivation, slot, what it shows) of the first derivation (by name) holding ``key``'s map of ``target``
    (a concept or class name, a class index, or ``DERIVATION/TARGET`` for one derivation), else None."""
    derivation, _, wanted = target.rpartition("/")
    names = run.derived_names()
    for name in [derivation] if derivation else names:
        if name not in names:
            raise RunError(
                f"--target {target!r}: {run.url} has no derived maps named {name!r} (derived: {', '.join(names) or 'none'})"
            )
        table = run.derived_metadata(name).filter(ds.field("key") == key)
        if table.num_rows == 0:
            continue
        record = table.slice(0, 1).to_pylist()[0]
        slots = list(zip(record["targets"], record["target_names"]))
        for slot, (class_index, slot_name) in enumerate(slots):
            if class_index == -1 and slot_name == wanted:
                return name, slot, f"concept {wanted}, derived {name}"
        try:
            wanted_class = run.class_index(wanted)
        except RunError:
            continue
        if wanted_class in record["targets"]:
            return (
                name,
                list(record["targets"]).index(wanted_class),
                f"class {run.class_names[wanted_class]} ({wanted_class}), derived {name}",
            )
    return None


def show_figure(run: Run, key: str, target: str | None, size: int) -> tuple[Image.Image, str]:
    """The figure of ``key``'s map of ``target`` and a one-line description of it. A target the run did not
    store for ``key`` is looked up among the maps ``cdam derive`` wrote (``DERIVATION/TARGET`` picks one)."""
    table = run.metadata.to_table(filter=ds.field("key") == key)
    if table.num_rows == 0:
        raise RunError(f"key {key!r} is not an explained image of {run.url}")
    record = table.slice(0, 1).to_pylist()[0]
    derived = None
    try:
        map_name, described = target_map(run, record, target)
    except RunError:
        if target is None or (derived := derived_slot(run, key, target)) is None:
            raise
        map_name, described = "derived", derived[2]
    tiles = TileRenderer(run)
    try:
        if derived is not None:
            values = run.read_rows(f"{DERIVED_GROUP}/{derived[0]}/cdam", np.asarray([record["row"]]))[
                0, derived[1]
            ].astype(np.float32)
        else:
            values = tiles.map_values(key, map_name)
        if not np.isfinite(values).any():
            raise RunError(
                f"key {key!r}: its maps were not written (the Zarr row reads as fill values, NaN); see `cdam verify {run.url}`"
            )
        image = tiles.model_view_image(key, size)
        if image is None:
            raise RunError(tiles.unreadable.get(key, f"image of {key!r} cannot be read"))
    finally:
        tiles.close()
    title = described.split(" (")[0].split(", derived")[0]
    scale = float(np.nanmax(np.abs(values)))
    subtitle = (
        f"{key}: CDAM, red = for, blue = against (scale ±{scale:.3g})"
        if map_name != "att"
        else f"{key}: last block's CLS attention"
    )
    return figure(image, values, title, subtitle), f"{described}, map scale ±{scale:.3g}"
