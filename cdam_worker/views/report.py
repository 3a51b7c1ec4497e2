"""``cdam report``: the overview, the audit's class leaderboard, per-class galleries and prototypes as one
self-contained HTML file (pictures inlined as data: URIs, no script, nothing loaded from anywhere).

Galleries are bounded: the ``n_classes`` most suspicious classes by the audit (without an audit, the
classes with the most predicted images), each with up to ``per_class`` images chosen by the audit (each
cluster's medoid, then its highest-scoring images). Every class stays in the leaderboard and class table.
"""

from __future__ import annotations

import base64
import sys
from html import escape

import numpy as np
from PIL import Image
from tqdm import tqdm

from cdam_worker.reading import Run
from cdam_worker.views import pages
from cdam_worker.views.app import static_file
from cdam_worker.views.catalog import Catalog
from cdam_worker.views.colormap import colorbar, symmetric_scale
from cdam_worker.views.render import display_size, encode, tile
from cdam_worker.views.tiles import TileRenderer

TILE = 160
PER_CLUSTER = 4
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def build_report(run: Run, n_classes: int = 20, per_class: int = 12) -> tuple[str, list[str]]:
    """The report's HTML and the notes on what it left out or could not show (also in the file)."""
    catalog = Catalog(run)
    tiles = TileRenderer(run, image_format="JPEG")
    counts = catalog.class_counts()
    leaderboard = catalog.leaderboard()
    if leaderboard:
        order = [row["class"] for row in leaderboard]
    else:
        order = [c["class"] for c in sorted(counts, key=lambda c: -c["predicted"]) if c["predicted"]]
    shown = order[:n_classes]
    errors, n_errors = catalog.errors()
    bar = data_uri(encode(Image.fromarray(colorbar(256, 14, vertical=False))), "image/png")

    def class_link(c: int) -> str:
        return f"#class-{c}" if c in shown else "#classes"

    medoids = catalog.flagged_medoids()
    for c in {m["class"] for m in medoids}:
        tiles.prefetch([m["medoid_key"] for m in medoids if m["class"] == c], f"c{c}", TILE)
    strip = pages.medoid_strip(
        medoids,
        lambda m: data_uri(tiles.tile(m["medoid_key"], "overlay", f"c{m['class']}", TILE), "image/jpeg"),
        class_link,
    )
    body = [
        "<header><h1>cdam report</h1>",
        f'<p class="muted">{escape(pages.LEGEND)} Hover a picture to see the image without its map.</p>',
        f'<p class="muted">{pages.colour_scale(bar, None)}; each picture\'s own scale is under it. {pages.WRONG_PREDICTION}.</p></header>',
        pages.overview(catalog.overview(), counts, leaderboard, errors, n_errors, catalog.no_audit, class_link, strip),
    ]
    if len(order) > len(shown):
        body.append(
            f'<p class="muted">Galleries below: {len(shown)} of {len(order)} classes (cdam report --classes N for more).</p>'
        )
    missing_maps: list[str] = []
    for c in tqdm(shown, desc="report", unit="class", file=sys.stderr):
        body.append(_class_section(catalog, tiles, c, per_class, missing_maps, bar))
    notes = list(run.skipped)
    if missing_maps:
        notes.append(
            f"{len(missing_maps)} image(s) shown have no stored map of their class (not a target, or a row not written; shown as 'no map'): {', '.join(missing_maps[:5])}{' ...' if len(missing_maps) > 5 else ''}"
        )
    notes += [f"image not shown: {reason}" for reason in tiles.unreadable.values()]
    tiles.close()
    body.insert(1, pages.notes(notes, "warn"))
    head = (
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><style>{static_file("style.css").decode()}</style>'
    )
    return pages.document(f"cdam report: {run.url}", "<main>" + "".join(body) + "</main>", head), notes


def _class_section(
    catalog: Catalog, tiles: TileRenderer, c: int, per_class: int, missing_maps: list[str], bar: str
) -> str:
    name = catalog.class_names[c]
    clusters = catalog.clusters(c)
    size = display_size(tiles.input_size, TILE)
    map_name = f"c{c}"
    chosen = catalog.chosen_images(c, PER_CLUSTER, per_class)
    keys = [key for key, _ in chosen] + [k["medoid_key"] for k in clusters if k["medoid_key"] in catalog.position]
    tiles.prefetch(keys, map_name, TILE)

    def picture(key: str, view: str) -> str:
        return data_uri(tiles.tile(key, view, map_name, TILE), "image/jpeg")

    def prototype(cluster: int) -> str:
        found = next(k for k in clusters if k["cluster"] == cluster)
        return data_uri(encode(tile("heatmap", None, found["prototype"], size), "JPEG"), "image/jpeg")

    def medoid(key: str) -> str:
        return (
            picture(key, "overlay")
            if key in catalog.position
            else data_uri(encode(tile("input", None, None, size), "JPEG"), "image/jpeg")
        )

    parts = [
        f'<section class="class" id="class-{c}"><h2>{escape(name)} <span class="muted">({c})</span></h2>',
        pages.class_audit(catalog.class_audit_row(c), catalog.no_audit),
        pages.prototypes(clusters, prototype, medoid, None),
    ]
    sheets = catalog.audit.contact_sheets.get(c, {}) if catalog.audit is not None else {}
    parts.append(
        pages.contact_sheets(
            [
                (data_uri(catalog.run.storage.get(sheets[k["cluster"]]), "image/png"), k)
                for k in clusters
                if k["cluster"] in sheets
            ]
        )
    )
    cards = []
    for key, why in chosen:
        values = tiles.map_values(key, map_name)
        if not np.isfinite(values).any():
            missing_maps.append(key)
        position = catalog.position[key]
        label = int(catalog.labels[position])
        caption = (
            f'<span class="key">{escape(key)}</span><br>{"no label" if label < 0 else "label " + escape(catalog.class_names[label])}'
            f' · pred {escape(catalog.class_names[int(catalog.preds[position])])}<br><span class="muted">{escape(why)}</span>'
            f"<br>{pages.colour_scale(bar, symmetric_scale(values))}"
        )
        wrong = label >= 0 and label != int(catalog.preds[position])
        cards.append(
            pages.card(picture(key, "overlay"), picture(key, "input"), caption, None, "wrong" if wrong else "")
        )
    parts.append(
        f"<h3>Images ({len(chosen)} chosen {'by the audit' if catalog.audit is not None else 'of those predicted as the class'})</h3>"
    )
    parts.append('<div class="gallery">' + "".join(cards) + "</div></section>")
    return "".join(parts)
