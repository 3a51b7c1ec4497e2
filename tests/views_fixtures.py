"""Builders for the views' tests: audit tables in the format ``cdam audit`` writes, a damaged copy of a
run, a dashboard served in a thread, and a page watcher for the browser tests."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bench.chromium import CHROMIUM_ARGS as HEADLESS_CHROMIUM_ARGS
from schemas import ERRORS_SCHEMA

REBINDING_HOST = "rebind.attacker.test"
"""A host name the tests' Chromium resolves to 127.0.0.1, as a DNS-rebinding attacker's would."""
CHROMIUM_ARGS = [*HEADLESS_CHROMIUM_ARGS, f"--host-resolver-rules=MAP {REBINDING_HOST} 127.0.0.1"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def write_audit(dest: str | Path) -> dict[str, object]:
    """Audit tables for a local run, with the columns ``cdam audit`` writes: two clusters per class (images
    alternate between them, cluster 1 of class 0 flagged), 2-D coordinates that separate the clusters
    (cluster k around x = 4k), prototypes that are the clusters' mean maps, a contact sheet for class 0's flagged cluster 1.
    Returns the truth the tests check against."""
    from cdam_worker.reading import open_run

    run = open_run(str(dest))
    index = run.index
    keys = index.column("key").to_pylist()
    preds = index.column("pred").to_numpy()
    rows = index.column("row").to_numpy()
    gh, gw = run.grid
    rng = np.random.default_rng(0)
    classes, clusters, images = [], [], []
    members: dict[int, dict[int, list[str]]] = {}
    for c, name in enumerate(run.class_names):
        positions = np.flatnonzero(preds == c)
        if positions.size == 0:
            continue
        class_keys = [keys[p] for p in positions]
        cluster = np.arange(positions.size) % 2
        maps = run.maps_for(class_keys, [c])[:, 0]
        members[c] = {k: [key for key, m in zip(class_keys, cluster) if m == k] for k in (0, 1)}
        x, y = 4.0 * cluster + rng.normal(0, 0.5, positions.size), rng.normal(0, 1, positions.size)
        for k in (0, 1):
            inside = cluster == k
            if not inside.any():  # a class with one image has one cluster
                continue
            clusters.append(
                {
                    "class": c,
                    "cluster": k,
                    "size": int(inside.sum()),
                    "share": float(inside.mean()),
                    "purity": 0.9,
                    "prototype": np.nanmean(maps[inside], axis=0).reshape(-1).astype(np.float32).tolist(),
                    "medoid_key": class_keys[int(np.flatnonzero(inside)[0])],
                    "flagged": c == 0 and k == 1,
                }
            )
        for j, p in enumerate(positions):
            images.append(
                {
                    "key": keys[p],
                    "row": int(rows[p]),
                    "class": c,
                    "cluster": int(cluster[j]),
                    "x": float(x[j]),
                    "y": float(y[j]),
                    "score": float(j % 7),
                    "flagged": bool(c == 0 and cluster[j] == 1),
                }
            )
        classes.append(
            {
                "class": c,
                "class_name": name,
                "n_images": int(positions.size),
                "score": 0.9 if c == 0 else 0.1 * c,
                "flagged": c == 0,
                "reasons": "a coherent cluster of 50% of the images puts 64% of its positive evidence on 2% of the area, in the bottom-right corner"
                if c == 0
                else "nothing stands out",
            }
        )
    order = sorted(classes, key=lambda r: -r["score"])
    for rank, row in enumerate(order, start=1):
        row["rank"] = rank
    audit = Path(dest) / "audit"
    shutil.rmtree(audit, ignore_errors=True)  # a real audit's files (cdam demo runs one) make way for these
    (audit / "contact-sheets").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(order), audit / "classes.parquet")
    pq.write_table(pa.Table.from_pylist(clusters), audit / "clusters.parquet")
    pq.write_table(pa.Table.from_pylist(images), audit / "images.parquet")
    Image.new("RGB", (64, 32), (200, 40, 40)).save(audit / "contact-sheets" / f"0-{run.class_names[0]}-cluster-1.png")
    (audit / "summary.json").write_text(json.dumps({"run": run.url, "by": "pred"}))
    return {"members": members, "grid": (gh, gw), "ranked": [row["class"] for row in order]}


HOSTILE_CLASS_NAMES = [
    '<img src=x onerror="window.pwned=1">',
    "</script><script>window.pwned=2</script>",
    'x" onmouseover="window.pwned=3',
    "c3",
    "c4",
    "c5",
]
HOSTILE_KEY_PREFIX = "<svg onload=alert(4)>'\"&amp;-"
"""Before each key's file name (keys are ``synthetic-00000N/<prefix>00000M``)."""
HOSTILE_JSON = (
    '{"caption": "</script><script>window.pwned=5</script><img src=x onerror=window.pwned=6>", '
    '"cell": "</td></tr><b>bold</b>"}'
)
HOSTILE_ELEMENTS_JS = (
    "document.querySelectorAll('[onerror], [onload], [onmouseover], svg, b, "
    'script:not([src]):not([type="application/json"])\').length'
)
"""How many elements of the page a payload would have made (0 when every payload stayed text)."""


def write_hostile_run(dest: Path, n_images: int = 240) -> dict[str, object]:
    """A synthetic run (bench/synthetic_run.py: real shards of small PNGs, 6 classes) whose class names, keys
    and sample json are HTML and script payloads, with audit tables (``write_audit``). Returns its keys."""
    from bench.synthetic_run import write_synthetic_run

    truth = write_synthetic_run(
        str(dest),
        n_images,
        n_classes=len(HOSTILE_CLASS_NAMES),
        n_targets=3,
        images_per_shard=n_images // 3,
        with_images=True,
        class_names=HOSTILE_CLASS_NAMES,
        key_prefix=HOSTILE_KEY_PREFIX,
        sample_json=HOSTILE_JSON,
    )
    write_audit(dest)
    return {"keys": truth["keys"].tolist()}


def damage_run(source: str | Path, dest: Path) -> dict[str, object]:
    """A copy of a finished run with what issue 12 §3 lists: a failed shard (no marker), error rows, rows
    whose maps read as NaN (a Zarr chunk object deleted), a partly written output (manifest 'running') and
    a shard whose tar is gone (its images unreadable); without an audit."""
    from cdam_worker.reading import open_run

    shutil.copytree(source, dest)
    shutil.rmtree(dest / "audit", ignore_errors=True)  # and no audit yet
    run = open_run(str(dest))
    shards = run.shards
    (dest / "markers" / f"{shards[-1].index:06d}.json").unlink()
    errors = pa.Table.from_pylist(
        [
            {
                "shard": shards[1].name,
                "shard_index": shards[1].index,
                "key": "broken-sample",
                "reason": "cannot identify image file 'broken-sample.png'",
                "run_id": "x",
            }
        ],
        schema=ERRORS_SCHEMA,
    )
    (dest / "errors").mkdir(exist_ok=True)
    pq.write_table(errors, dest / "errors" / f"{shards[1].index:06d}-{shards[1].name}.parquet")
    for array in run.array_names:  # rows 0..15 (shard 0's first 16 images): every array reads as fill values
        shutil.rmtree(dest / "cdam.zarr" / array / "c" / "0")
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["status"] = "running"
    manifest["settings"]["shards"][2]["url"] = str(dest / "moved-away.tar")  # shard 2's images cannot be read
    (dest / "manifest.json").write_text(json.dumps(manifest))
    index = run.index
    nan_keys = [k for k, r in zip(index.column("key").to_pylist(), index.column("row").to_pylist()) if r < 16]
    rows_per_shard = int(run.attrs["rows_per_shard"])
    unreadable = [
        k
        for k, r in zip(index.column("key").to_pylist(), index.column("row").to_pylist())
        if r // rows_per_shard == shards[2].index
    ]
    return {
        "skipped_shard": shards[-1].name,
        "skipped_first_row": shards[-1].index * rows_per_shard,
        "unreadable_keys": unreadable,
        "nan_keys": nan_keys,
        "error_key": "broken-sample",
    }


@contextlib.contextmanager
def serving(dest: str, token: str | None = None, allow_hosts: tuple[str, ...] = ()) -> Iterator[str]:
    """``cdam serve``'s app over ``dest`` (requiring ``token`` if given) in a uvicorn thread on 127.0.0.1 and
    a free port; yields its URL (without the token)."""
    from cdam_worker.reading import open_run
    from cdam_worker.views.app import create_app

    with serving_app(create_app(open_run(dest), "127.0.0.1", allow_hosts, token)) as url:
        yield url


@contextlib.contextmanager
def serving_app(app: object) -> Iterator[str]:
    """An ASGI app made by ``create_app`` in a uvicorn thread on 127.0.0.1 and a free port; yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


class PageWatch:
    """Console errors, page errors and every request URL of a browser page."""

    def __init__(self, page) -> None:  # noqa: ANN001 - playwright Page
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("request", lambda request: self.requests.append(request.url))

    def foreign_requests(self, *allowed_prefixes: str) -> list[str]:
        return [url for url in self.requests if not url.startswith((*allowed_prefixes, "data:", "blob:"))]


NON_BLANK_IMAGES_JS = """(selector) => [...document.querySelectorAll(selector)].map((img) => {
  if (!img.complete || img.naturalWidth === 0) return -1;
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let sum = 0, sum2 = 0, n = data.length / 4;
  for (let i = 0; i < data.length; i += 4) { const v = (data[i] + data[i + 1] + data[i + 2]) / 3; sum += v; sum2 += v * v; }
  return Math.sqrt(Math.max(0, sum2 / n - (sum / n) ** 2));
})"""
"""Per image: -1 if not loaded, else the standard deviation of its grey levels (0 = blank)."""


def png_stats(data: bytes) -> tuple[tuple[int, int], float]:
    picture = Image.open(io.BytesIO(data)).convert("RGB")
    return picture.size, float(np.asarray(picture, dtype=np.float32).std())
