"""Bench: how fast the ``cdam serve`` dashboard shows a 48-image gallery page of a 50,000-image run.

Writes (or reuses) a synthetic run in the real output format with real image shards
(``bench/synthetic_run.py``) and audit tables, starts ``cdam serve RUN --port 0`` in a process of its own (as
a user does), and times a class's first gallery page:

- over HTTP: the gallery API call, then its 48 tiles fetched 6 at a time (as a browser does);
- in headless Chromium (if /usr/bin/chromium exists): from navigation to the class page until all 48
  pictures are loaded, by the page's own clock; five classes cold in the tab that showed the overview (as a
  user clicks through), five cold in new tabs (each with a renderer process to start), two warm.

Cold: nothing of the page cached (its map chunks and images read, its tiles rendered); warm: the same page
again. The server indexes where each image lies in its shard in the background from its start (it prints a
line when done): from the run's ``members/`` tables, or for a run made before them by scanning the shards' tar
headers; a page opened before that pays for indexing its shards. ``--screenshot RUN OUT.png``
instead saves a screenshot of a class page of RUN (the README's).

    python -m bench.bench_views --run /tmp/cdam-views-bench-run
    python -m bench.bench_views --run /tmp/cdam-views-bench-photos --photos 500x375   # ImageNet-sized JPEGs (2.8 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.chromium import CHROMIUM, CHROMIUM_ARGS

REPO = Path(__file__).resolve().parent.parent

LISTENING = r"cdam serve: (http://\S+)/ "
"""The line `cdam serve` prints once it listens (its address in group 1)."""
VIEWPORT = {"width": 1400, "height": 1000}


def write_run(dest: Path, n_images: int, n_classes: int, photo_size: tuple[int, int] | None) -> None:
    """A synthetic run with image shards (small PNGs, or JPEGs of ``photo_size``) and audit tables (three
    clusters per class)."""
    from bench.synthetic_run import write_synthetic_run
    from cdam_worker.reading import open_run

    write_synthetic_run(str(dest), n_images, n_classes=n_classes, with_images=True, photo_size=photo_size)
    run = open_run(str(dest))
    index = run.index
    rng = np.random.default_rng(0)
    preds = index.column("pred").to_numpy()
    cluster = rng.integers(0, 3, len(preds))
    images = pa.table(
        {
            "key": index.column("key"),
            "row": index.column("row"),
            "class": pa.array(preds, pa.int32()),
            "cluster": cluster,
            "x": rng.normal(size=len(preds)) + 3 * cluster,
            "y": rng.normal(size=len(preds)),
            "score": rng.uniform(size=len(preds)),
            "flagged": cluster == 2,
        }
    )
    gh, gw = run.grid
    clusters = [
        {
            "class": c,
            "cluster": k,
            "size": int(((preds == c) & (cluster == k)).sum()),
            "share": 1 / 3,
            "purity": 0.9,
            "prototype": np.zeros(gh * gw, np.float32).tolist(),
            "medoid_key": index.column("key")[int(np.flatnonzero((preds == c) & (cluster == k))[0])].as_py(),
            "flagged": k == 2,
        }
        for c in range(n_classes)
        for k in range(3)
    ]
    classes = [
        {
            "class": c,
            "class_name": run.class_names[c],
            "n_images": int((preds == c).sum()),
            "score": 1 - c / n_classes,
            "rank": c + 1,
            "flagged": c == 0,
            "reasons": "synthetic",
        }
        for c in range(n_classes)
    ]
    (dest / "audit").mkdir(exist_ok=True)
    for name, table in (
        ("images", images),
        ("clusters", pa.Table.from_pylist(clusters)),
        ("classes", pa.Table.from_pylist(classes)),
    ):
        pq.write_table(table, dest / "audit" / f"{name}.parquet")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def time_http_page(base: str, class_index: int) -> float:
    """Seconds for the gallery API call and its 48 tiles, 6 requests at a time."""
    started = time.perf_counter()
    page = json.loads(fetch(f"{base}/api/gallery?class={class_index}&offset=0&limit=48&view=overlay"))
    with ThreadPoolExecutor(6) as pool:
        sizes = list(pool.map(lambda item: len(fetch(base + item["tile"])), page["items"]))
    assert len(sizes) == 48 and min(sizes) > 100
    return time.perf_counter() - started


def time_browser_page(page, base: str, class_index: int) -> float:  # noqa: ANN001 - playwright Page
    """Seconds from navigating ``page`` (a tab) to the class page until its 48 gallery pictures are loaded,
    by the page's own clock (``performance.now()`` from navigation start), checked on every animation frame."""
    page.goto(f"{base}/class/{class_index}", wait_until="commit")
    page.wait_for_function(ALL_PICTURES_LOADED, polling="raf", timeout=120_000)
    return page.evaluate("window.__picturesLoaded") / 1000


def time_new_tab(browser, base: str, class_index: int) -> float:  # noqa: ANN001 - playwright Browser
    """:func:`time_browser_page` in a tab of its own (Chromium starts a renderer process for it)."""
    page = browser.new_page(viewport=VIEWPORT)
    try:
        return time_browser_page(page, base, class_index)
    finally:
        page.close()


ALL_PICTURES_LOADED = """() => {
  const all = [...document.querySelectorAll('#gallery img')];
  if (all.length !== 48 || !all.every((i) => i.complete && i.naturalWidth > 0)) return false;
  window.__picturesLoaded = performance.now();
  return true;
}"""


class ServeCommand:
    """``cdam serve RUN --port 0`` in a process of its own, as a user runs it; its stderr lines, timed."""

    def __init__(self, run: Path) -> None:
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jobs", "serve", str(run), "--port", "0"],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put((time.perf_counter() - self.started, line.strip()))

    def wait_for(self, pattern: str) -> tuple[float, re.Match]:
        """(seconds since start, match) of the first stderr line matching ``pattern``."""
        while True:
            try:
                seconds, line = self.lines.get(timeout=300)
            except queue.Empty:
                raise SystemExit(f"cdam serve printed no line matching {pattern!r} in 300 s") from None
            if match := re.search(pattern, line):
                return seconds, match

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=30)


def screenshot(run: Path, out: Path, class_index: int) -> None:
    """A screenshot of a class page of ``run``, saved as a small palette PNG."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    server = ServeCommand(run)
    try:
        base = server.wait_for(LISTENING)[1].group(1)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(
                viewport={"width": 1280, "height": 1400}
            )  # tall: the whole first page of the gallery
            page.goto(f"{base}/class/{class_index}")
            page.wait_for_function(
                "() => { const all = [...document.querySelectorAll('#gallery img')]; return all.length > 0 && all.every((i) => i.complete && i.naturalWidth > 0); }",
                polling="raf",
                timeout=120_000,
            )
            page.screenshot(path=str(out))
            browser.close()
    finally:
        server.stop()
    Image.open(out).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run",
        type=Path,
        default=Path("/tmp/cdam-views-bench-run"),
        help="where the synthetic run is written (reused if there)",
    )
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument(
        "--photos",
        metavar="WxH",
        help="the run's images as JPEGs of this size (ImageNet's are about 500x375) instead of 56x56 PNGs",
    )
    parser.add_argument(
        "--screenshot", nargs=2, metavar=("RUN", "OUT"), help="save a screenshot of a class page of RUN to OUT and exit"
    )
    parser.add_argument("--screenshot-class", type=int, default=0)
    args = parser.parse_args()
    if args.screenshot:
        screenshot(Path(args.screenshot[0]), Path(args.screenshot[1]), args.screenshot_class)
        return
    if not (args.run / "manifest.json").exists():
        started = time.perf_counter()
        photo_size = tuple(int(v) for v in args.photos.lower().split("x")) if args.photos else None
        write_run(args.run, args.images, args.classes, photo_size)
        print(
            f"wrote the synthetic run ({args.images} images{f' of {args.photos} JPEGs' if photo_size else ''}, {args.classes} classes) in {time.perf_counter() - started:.0f} s"
        )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    results = {}
    server = ServeCommand(args.run)
    try:
        results["cdam serve: start to listening (imports, index read)"], listening = server.wait_for(LISTENING)
        base = listening.group(1)
        results["HTTP, cold, while the shards are indexed (class 1)"] = time_http_page(base, 1)
        results["HTTP, warm (class 1)"] = time_http_page(base, 1)
        results["shards indexed (background, from start)"], _ = server.wait_for(r"^indexed the images of \d+ shard")
        results["HTTP, cold, after indexing (class 3)"] = time_http_page(base, 3)
        if Path(CHROMIUM).exists():
            from playwright.sync_api import sync_playwright

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                tab = browser.new_page(viewport=VIEWPORT)  # as a user comes from the overview, in its tab
                tab.goto(base + "/")
                for class_index in (2, 4, 6, 8, 10):
                    results[f"Chromium, cold, in the overview's tab (class {class_index})"] = time_browser_page(
                        tab, base, class_index
                    )
                for class_index in (12, 14, 16, 18, 20):
                    results[f"Chromium, cold, in a new tab (class {class_index})"] = time_new_tab(
                        browser, base, class_index
                    )
                for class_index in (2, 4):
                    results[f"Chromium, warm, in the overview's tab (class {class_index})"] = time_browser_page(
                        tab, base, class_index
                    )
                browser.close()
    finally:
        server.stop()
    for name, seconds in results.items():
        print(f"{name:60s} {seconds:6.3f} s")


if __name__ == "__main__":
    main()
