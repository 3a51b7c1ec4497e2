"""HTML of the views, shared by the dashboard (``cdam serve``) and the static report (``cdam report``).

Every function returns a fragment (text already escaped); links and picture sources come from the
caller, so the same overview links to ``/class/3`` on the server and to ``#class-3`` in the report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from html import escape
from typing import Any

from cdam_worker.audit.cues import KIND_WORDS

LEGEND = "Colours: red = evidence for the class, blue = evidence against it, white/clear = none; each map has its own symmetric scale (±its largest |value|), upsampled from tokens to pixels for display only."
WRONG_PREDICTION = (
    '<span class="legend-wrong">red border</span> = a wrong prediction (the image\'s label is another class)'
)


def document(title: str, body: str, head: str) -> str:
    """A whole HTML page; ``head`` holds its style and scripts (links on the server, inline in the report)."""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>{head}</head>'
        f"<body>{body}</body></html>\n"
    )


def number(value: Any, digits: int = 3) -> str:
    """A number for a table cell: integers as they are, floats to ``digits`` significant digits, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return escape(str(value))


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def notes(lines: Sequence[str], kind: str = "note") -> str:
    """A box of one-line notes (what was not read and why, missing audit ...); empty without lines."""
    if not lines:
        return ""
    return f'<div class="notes {kind}" role="status">' + "".join(f"<p>{escape(line)}</p>" for line in lines) + "</div>"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], css: str = "") -> str:
    """A table; cells are HTML fragments (escape text before)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def overview(
    facts: dict[str, Any],
    class_counts: list[dict[str, Any]],
    leaderboard: list[dict[str, Any]],
    errors: list[dict[str, Any]],
    n_errors: int,
    no_audit: str,
    class_link: Callable[[int], str],
    strip: str = "",
) -> str:
    """The overview: run facts, what was skipped, the audit's leaderboard (after ``strip``, the flagged
    classes' medoids), classes, errors."""
    variant = dict(facts["variant"]) if isinstance(facts["variant"], dict) else {"variant": str(facts["variant"])}
    variant_text = str(variant.pop("variant", "?")) + "".join(
        f", {name.replace('_', ' ')} {value}" for name, value in variant.items()
    )
    run_rows = [
        (
            "run",
            f"<code>{escape(facts['url'])}</code>"
            + ("" if facts["complete"] else ' <span class="warn">(not complete)</span>'),
        ),
        ("model", f"{escape(facts['model'])} ({escape(str(facts['method']))})"),
        (
            "targets",
            escape(str(facts["targets"]))
            + (f"; concepts: {escape(', '.join(facts['concepts']))}" if facts["concepts"] else ""),
        ),
        ("variant", escape(variant_text)),
        ("maps", f"{escape(facts['grid'])} over a {escape(facts['input_size'])} input, {escape(facts['maps_dtype'])}"),
        (
            "images",
            f"{facts['n_images']} explained in {facts['shards_complete']} of {facts['n_shards']} shards; {facts['n_errors']} error row(s)",
        ),
        (
            "accuracy",
            f"{percent(facts['accuracy'])} on {facts['n_labelled']} labelled image(s)"
            if facts["accuracy"] is not None
            else "no labels",
        ),
        ("classes", str(facts["n_classes"])),
    ]
    parts = [
        notes(facts["skipped"], "warn"),
        "<h2>Run</h2>",
        '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in run_rows) + "</dl>",
    ]
    parts.append("<h2>Audit: classes by suspicion</h2>" + strip)
    if facts.get("audit_flags"):
        parts.append(
            f'<p class="audit-flags">This audit: <code>cdam audit DEST {escape(facts["audit_flags"])}</code></p>'
        )
    if leaderboard:
        rows = [
            [
                str(r["rank"]),
                f'<a href="{class_link(r["class"])}">{escape(r["class_name"])}</a>',
                str(r["n_images"]),
                number(r["score"]),
                '<span class="flag">flagged</span>' if r["flagged"] else "",
                escape(kinds_in_words(r.get("kinds"))),
                MODEL_VERDICTS[r.get("relied_on")],
                escape(_reasons(r["reasons"])),
            ]
            for r in leaderboard
        ]
        parts.append(
            table(["rank", "class", "images", "score", "", "finding", "model", "reasons"], rows, "leaderboard")
        )
    else:
        parts.append(notes([no_audit]))
    parts.append("<h2>Classes</h2>")
    shown = [c for c in class_counts if c["predicted"] or c["labelled"]]
    rows = [
        [
            f'<a href="{class_link(c["class"])}">{escape(c["name"])}</a>',
            str(c["predicted"]),
            str(c["labelled"]),
            percent(c["accuracy"]),
        ]
        for c in shown
    ]
    parts.append(table(["class", "predicted", "labelled", "accuracy on its labels"], rows, "classes"))
    if len(shown) < len(class_counts):
        parts.append(
            f'<p class="muted">{len(class_counts) - len(shown)} class(es) with no image predicted or labelled as them are not listed.</p>'
        )
    parts.append(f"<h2>Errors ({n_errors})</h2>")
    if errors:
        rows = [[escape(e["shard"]), escape(e["key"] or "(whole shard)"), escape(e["reason"])] for e in errors]
        parts.append(table(["shard", "key", "reason"], rows, "errors"))
        if n_errors > len(errors):
            parts.append(
                f'<p class="muted">{n_errors - len(errors)} more: <code>cdam query {escape(facts["url"])} "SELECT * FROM errors"</code></p>'
            )
    else:
        parts.append('<p class="muted">No sample failed.</p>')
    return "".join(parts)


def kinds_in_words(kinds: list[str] | None) -> str:
    """The kinds of a class's flagged findings (``classes.parquet``'s ``kinds``), in words."""
    return "; ".join(KIND_WORDS.get(kind, kind) for kind in dict.fromkeys(kinds or []))


def _reasons(reasons: Any) -> str:
    if isinstance(reasons, list):
        return "; ".join(str(r) for r in reasons)
    return str(reasons or "")


MODEL_VERDICTS = {True: "relies on it", False: "does not rely on it", None: "unconfirmed"}
"""The model's verdict on a class's or cluster's cue (``relied_on``; null: not tested, or an audit without the model)."""


def class_audit(audit_row: dict[str, Any] | None, no_audit: str) -> str:
    """The audit's verdict on a class (with the model's, when it tested the class), or the note that there is no audit."""
    if audit_row is None:
        return notes([no_audit])
    flag = '<span class="flag">flagged</span> ' if audit_row["flagged"] else ""
    relied = audit_row.get("relied_on")
    model = {
        True: "The model relies on the cue the maps point at (counterfactual test).",
        False: "The model does not rely on what the maps point at (counterfactual test): not a shortcut it uses.",
        None: "Unconfirmed: not tested with the model." if audit_row["flagged"] else "",
    }[relied]
    model = f"<strong>{model}</strong> " if model else ""
    if audit_row.get("kinds"):
        flag += f"<strong>{escape(kinds_in_words(audit_row['kinds']))}</strong>: "
    return (
        f'<p class="verdict">{flag}rank {audit_row["rank"]}, suspicion score {number(audit_row["score"])} '
        f"over {audit_row['n_images']} image(s). {model}{escape(_reasons(audit_row['reasons']))}</p>"
    )


def cluster_confirmation(c: dict[str, Any]) -> str:
    """A cluster's model test in one line (empty when it was not tested)."""
    if c.get("relied_on") is None:
        return ""
    drop = f"{number(c['removal_logit_drop'])} [{number(c['removal_logit_drop_low'])}, {number(c['removal_logit_drop_high'])}]"
    flips = (
        f"{percent(c['paste_flip_rate'])} [{percent(c['paste_flip_rate_low'])}, {percent(c['paste_flip_rate_high'])}]"
    )
    return (
        f'<br><span class="{"flag" if c["relied_on"] else "muted"}">model {MODEL_VERDICTS[c["relied_on"]]}</span>: '
        f"logit drop {drop} ({c['confirm_images']} img), flips {flips} ({c['paste_images']} img)"
    )


def prototypes(
    clusters: list[dict[str, Any]],
    prototype_src: Callable[[int], str],
    medoid_src: Callable[[str], str],
    cluster_link: Callable[[int], str] | None,
) -> str:
    """The audit's clusters of a class: prototype (mean map), medoid image, size, share, purity, the model's test."""
    if not clusters:
        return ""
    cards = []
    for c in clusters:
        title = f"cluster {c['cluster']}"
        flag = (
            f' <span class="flag">flagged: {escape(KIND_WORDS.get(c.get("kind") or "", "a likely shortcut"))}</span>'
            if c["flagged"]
            else ""
        )
        heading = (
            f'<a href="{cluster_link(c["cluster"])}" data-cluster="{c["cluster"]}">{title}</a>'
            if cluster_link
            else title
        )
        cards.append(
            f'<figure class="cluster{" flagged" if c["flagged"] else ""}">'
            f'<div class="pair"><img alt="prototype of {title}" src="{prototype_src(c["cluster"])}">'
            f'<img alt="medoid of {title}" src="{medoid_src(c["medoid_key"])}"></div>'
            f"<figcaption>{heading}{flag}<br>"
            f"{c['size']} images ({percent(c['share'])}), purity {percent(c['purity'])}{cluster_confirmation(c)}<br>"
            f'<span class="muted">prototype | medoid {escape(c["medoid_key"])}</span></figcaption></figure>'
        )
    return '<h3>Clusters: prototype (mean map) and medoid</h3><div class="clusters">' + "".join(cards) + "</div>"


def medoid_strip(
    medoids: list[dict[str, Any]], src: Callable[[dict[str, Any]], str], class_link: Callable[[int], str]
) -> str:
    """A row of the flagged clusters' medoids (the image nearest each cluster's centre, its class map
    overlaid), each linking to its class; empty when nothing is flagged."""
    if not medoids:
        return ""
    figures = "".join(
        f'<figure class="medoid"><a href="{class_link(m["class"])}"><img alt="medoid of {escape(m["class_name"])} cluster {m["cluster"]}" src="{src(m)}">'
        f'<figcaption>{escape(m["class_name"])} · cluster {m["cluster"]}<br><span class="muted">{m["size"]} images{"" if m["score"] is None else ", score " + number(m["score"], 2)}</span></figcaption></a></figure>'
        for m in medoids
    )
    return f'<p class="muted">What the audit flagged: each flagged cluster\'s medoid with its class map.</p><div class="strip">{figures}</div>'


def colour_scale(bar_src: str, scale: float | None) -> str:
    """A small colour bar with the values of its ends, ±``scale`` (None: ±1 x each map's own scale; 0: no map)."""
    if scale == 0:
        return '<span class="scale muted">no map, no scale</span>'
    low, high = (f"−{scale:.3g}", f"+{scale:.3g}") if scale is not None else ("−1", "+1 × each map's largest |value|")
    return (
        f'<span class="scale"><span class="end">{low}</span><img alt="colour bar from {low} (blue) through 0 (white) to {high} (red)" '
        f'src="{bar_src}"><span class="end">{high}</span></span>'
    )


def contact_sheets(sheets: Sequence[tuple[str, dict]]) -> str:
    """The audit's contact sheets of a class, one per flagged cluster (its source and its ``clusters.parquet``
    row), each collapsed: the spot (or, for a background cue, the whole input) of each of the cluster's images."""
    parts = []
    for src, cluster in sheets:
        kind = KIND_WORDS.get(cluster.get("kind") or "", "flagged")
        what = "the whole image" if cluster.get("kind") == "background" else "the spot"
        parts.append(
            f'<details class="sheet"><summary>Contact sheet of cluster {cluster["cluster"]} ({escape(kind)}, '
            f"{cluster['size']} images): {what} of each image, most suspicious first, at most 64 (open it)</summary>"
            f'<div class="sheet-box"><img class="sheet" alt="contact sheet of cluster {cluster["cluster"]}" src="{src}"></div></details>'
        )
    return "".join(parts)


def card(src: str, alt_src: str | None, caption: str, href: str | None, css: str = "") -> str:
    """A gallery card: a tile (``alt_src``, if given, shows on hover), its caption, and a link."""
    images = f'<img class="main" alt="" src="{src}">' + (f'<img class="alt" alt="" src="{alt_src}">' if alt_src else "")
    inner = f'<div class="tile">{images}</div><figcaption>{caption}</figcaption>'
    return f'<figure class="card {css}">' + (f'<a href="{href}">{inner}</a>' if href else inner) + "</figure>"


def json_data(element_id: str, payload: Any) -> str:
    """Data for the page's script, as a non-executed JSON block (the CSP forbids inline scripts)."""
    text = json.dumps(payload).replace("<", "\\u003c")
    return f'<script type="application/json" id="{element_id}">{text}</script>'
