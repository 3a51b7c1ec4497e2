"""The views of a run: the ``cdam serve`` dashboard and the ``cdam report`` file driven in a real headless
Chromium, ``cdam show`` figures checked as pictures, the FiftyOne export's files, and every command on a
damaged run and on S3 with transient faults (issue 10, issue 12 §3).

Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import shutil
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlparse

import numpy as np
import pytest
from PIL import Image

from bench.chromium import CHROMIUM
from conftest import TEST_ACCESS_KEY, TEST_SECRET
from views_fixtures import (
    ARTIFACTS,
    CHROMIUM_ARGS,
    HOSTILE_CLASS_NAMES,
    HOSTILE_ELEMENTS_JS,
    HOSTILE_JSON,
    NON_BLANK_IMAGES_JS,
    REBINDING_HOST,
    PageWatch,
    damage_run,
    png_stats,
    serving,
    write_audit,
    write_hostile_run,
)

from cdam_worker.derive import derive_maps
from cdam_worker.reading import open_run
from cdam_worker.views.catalog import Catalog
from jobs.cli import main

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def audited_run(demo_run: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """A copy of the demo run with audit tables (the format ``cdam audit`` writes) and what they hold."""
    dest = tmp_path_factory.mktemp("views") / "run"
    shutil.copytree(demo_run, dest)
    return str(dest), write_audit(dest)


@pytest.fixture(scope="module")
def browser():  # noqa: ANN201 - playwright Browser
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def raw_get(base: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side normalisation of '..')."""
    address = urlparse(base)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read()


def wait_until(page, expression: str, timeout: float = 30.0) -> None:  # noqa: ANN001 - playwright Page
    """Poll a JavaScript expression until it is true (page.wait_for_function would need 'unsafe-eval',
    which the dashboard's Content-Security-Policy forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(50)


def wait_total(page, expected: int) -> None:  # noqa: ANN001
    wait_until(page, f"document.getElementById('gallery').dataset.total === '{expected}'")


def wait_images(page, selector: str) -> list[float]:  # noqa: ANN001
    wait_until(
        page,
        f"(() => {{ const all = [...document.querySelectorAll({selector!r})]; return all.length > 0 && all.every((i) => i.complete && i.naturalWidth > 0); }})()",
    )
    return page.evaluate(NON_BLANK_IMAGES_JS, selector)


def test_colour_map_is_symmetric_and_centred_on_zero() -> None:
    from cdam_worker.views.colormap import LUT_SIZE, MISSING_GREY, colorize, overlay, symmetric_scale

    values = np.array([[-2.0, -1.0, 0.0], [1.0, 2.0, np.nan]], dtype=np.float32)
    scale = symmetric_scale(values)
    colours = colorize(values, scale).astype(int)
    assert scale == 2.0 and LUT_SIZE % 2 == 1
    assert colours[0, 0, 2] > colours[0, 0, 0] and colours[1, 1, 0] > colours[1, 1, 2]  # -scale cool, +scale warm
    assert np.all(colours[0, 2] > 240) and tuple(colours[1, 2]) == MISSING_GREY  # 0 white, NaN grey
    assert (
        np.abs((colours[0, 1] + colours[1, 0]) - (colours[0, 0] + colours[1, 1])).max() > 0
    )  # halfway is lighter than the ends
    image = np.full((2, 3, 3), 90, dtype=np.uint8)
    blended = overlay(image, values, scale)
    assert np.array_equal(blended[0, 2], image[0, 2]) and np.array_equal(
        blended[1, 2], image[1, 2]
    )  # 0 and NaN leave the image
    change = np.linalg.norm(blended.astype(float) - image, axis=2)
    assert (
        change[1, 1] > change[1, 0] > 10 and change[0, 0] > change[0, 1] > 10
    )  # the colour shows more as |value| grows


@pytest.mark.parametrize(
    "config",
    [
        {"crop_pct": 0.875, "crop_mode": "center"},
        {"crop_pct": 0.95, "crop_mode": "squash"},
        {"crop_pct": 1.0, "crop_mode": "border"},
        {"crop_pct": 0.9, "crop_mode": "center", "input_size": [3, 224, 160]},
        {"crop_pct": 1.0, "crop_mode": "center"},
        {"crop_pct": 1.15, "crop_mode": "center"},
        {"crop_mode": "squash", "input_size": [3, 224, 192]},
    ],
)
def test_model_view_at_display_size_is_the_eval_transform_resampled_once(config: dict) -> None:
    """The model's view at a tile's size is the same picture as the run's eval transform (resize, crop)
    followed by a resize to that size, from one resample of the crop's box, or from the steps themselves
    where they pad (a border crop of an image of another aspect ratio)."""
    from cdam_worker.views.render import ModelView

    view = ModelView(
        {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, **config}
    )
    for width, height in [(500, 375), (300, 600), (56, 56), (223, 224)]:
        y, x = np.mgrid[0:height, 0:width]
        smooth = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin(x / 40) * np.cos(y / 30)], axis=-1)
        image = Image.fromarray(smooth.round().astype(np.uint8))
        expected = image
        for step in view.steps:
            expected = step(expected)
        size = (96, round(96 * view.input_size[1] / view.input_size[0]))
        shown = view(image, size)
        assert shown.size == size and view(image).size == view.input_size == expected.size
        difference = np.abs(
            np.asarray(shown, dtype=np.float64)
            - np.asarray(expected.resize(size, Image.Resampling.BICUBIC), dtype=np.float64)
        )
        assert difference.mean() < 0.5 and np.percentile(difference, 99) <= 2, (width, height, difference.mean())
        pads = (config["crop_mode"] == "border" and width != height) or config.get("crop_pct", 0.875) > 1
        assert (view.box(image.size) is None) == pads
    timm_view = ModelView(view.config)
    timm_view.plain_steps = None  # the geometry of timm's own steps
    for width in range(1, 600):  # every box lies inside its image (Pillow refuses one a rounding error past an edge)
        for height in (width, 1, 37, 375, 1000):
            box = view.box((width, height))
            assert box == timm_view.box((width, height)), (width, height)  # the torch-free geometry is timm's
            assert box is None or (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height), (
                width,
                height,
                box,
            )


def test_cdam_serve_command_binds_loopback_and_stops_on_ctrl_c(audited_run: tuple[str, dict]) -> None:
    import signal
    import subprocess
    import sys

    dest, _ = audited_run
    server = subprocess.Popen(
        [sys.executable, "-m", "jobs", "serve", dest, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        lines = []
        while not (lines and lines[-1].startswith("cdam serve: http://")):
            line = server.stderr.readline()
            assert line, f"cdam serve exited: {''.join(lines)}"
            lines.append(line)
        url = lines[-1].split()[2]
        assert url.startswith("http://127.0.0.1:")
        status, body = get(url)
        assert status == 200 and b"Audit: classes by suspicion" in body
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(60) == 130  # 128 + SIGINT, like every cdam command stopped by Ctrl-C
    assert server.stderr.read().strip().splitlines()[-1] == "cdam serve: stopped by SIGINT"


def test_served_connections_send_small_responses_without_delay() -> None:
    """The server's socket is one asyncio turns Nagle's algorithm off on: with it on, each response after the
    first on a kept-alive connection waits for the client's delayed ACK (40 ms a tile)."""
    import asyncio
    import socket

    from jobs.serve import listen

    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        listener = listen("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        _, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
        try:
            return await asyncio.wait_for(seen, 30)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_dashboard_in_a_browser(audited_run: tuple[str, dict], browser) -> None:  # noqa: ANN001
    dest, truth = audited_run
    catalog = Catalog(open_run(dest))
    in_class = np.flatnonzero((catalog.preds == 0) | (catalog.labels == 0))
    wrong = in_class[catalog.preds[in_class] != catalog.labels[in_class]]
    assert len(in_class) > 48 and 0 < len(wrong) < len(in_class), (
        "the demo run should give class 0 two pages and some mistakes"
    )
    with serving(dest) as url:
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        watch = PageWatch(page)
        page.goto(url + "/")
        assert page.inner_text("table.leaderboard tbody tr >> nth=0").split("\t")[:2] == ["1", catalog.class_names[0]]
        assert "flagged" in page.inner_text("table.leaderboard tbody tr >> nth=0")
        # the overview's strip: the medoid of each flagged cluster (here class 0's cluster 1), linking to its class
        assert page.eval_on_selector_all(".strip a", "(all) => all.map((a) => a.getAttribute('href'))") == ["/class/0"]
        assert min(wait_images(page, ".strip img")) > 5
        strip_src = page.get_attribute(".strip img", "src")
        assert (
            f"key={quote(truth['members'][0][1][0])}" in strip_src
            and "map=c0" in strip_src
            and "view=overlay" in strip_src
        )
        assert page.inner_text(".strip figcaption").startswith(f"{catalog.class_names[0]} · cluster 1")
        page.screenshot(path=str(ARTIFACTS / "dashboard-overview.png"), full_page=True)

        page.click("table.leaderboard a >> nth=0")
        page.wait_for_url(f"{url}/class/0")
        wait_total(page, len(in_class))
        contrast = wait_images(page, "#gallery img")
        assert len(contrast) == 48 and min(contrast) > 5, f"blank or missing gallery pictures: {contrast}"
        assert min(wait_images(page, ".clusters img")) > 1
        # the red border's legend, drawn with the wrong cards' own border
        assert page.inner_text(".legend") == "red border = a wrong prediction (the image's label is another class)"
        # the contact sheet of the flagged cluster: collapsed, its summary in page-sized text naming the cluster and
        # its kind; the plot is not pushed down
        assert page.eval_on_selector("details.sheet", "(d) => d.open") is False
        assert page.inner_text("details.sheet summary").startswith("Contact sheet of cluster 1 (")
        assert (
            float(page.eval_on_selector("details.sheet summary", "(n) => parseFloat(getComputedStyle(n).fontSize)"))
            >= 14
        )
        assert page.locator("#scatter").bounding_box()["y"] < 900
        page.click("details.sheet summary")
        wait_until(page, "document.querySelector('details.sheet').open && document.querySelector('img.sheet').complete")
        assert page.eval_on_selector("img.sheet", "(i) => [i.naturalWidth, i.getBoundingClientRect().width]") == [
            64,
            66,
        ]  # its own size (+ border)
        page.click("details.sheet summary")
        page.screenshot(path=str(ARTIFACTS / "dashboard-class.png"), full_page=True)

        page.select_option("#filter-correct", "no")  # a filter changes the gallery
        wait_total(page, len(wrong))
        border = "(n) => getComputedStyle(n).borderTopColor + ' ' + getComputedStyle(n).borderTopWidth"
        wrong_border = page.eval_on_selector("#gallery figure.wrong", border)
        assert wrong_border == page.eval_on_selector(".legend-wrong", border) and wrong_border.startswith(
            "rgb(221, 51, 51)"
        )
        assert page.eval_on_selector(".clusters figure", border) != wrong_border
        assert set(page.eval_on_selector_all("#gallery figure", "(all) => all.map((f) => f.dataset.key)")) == {
            catalog.keys[p] for p in wrong[:48]
        }
        page.select_option("#filter-correct", "")
        wait_total(page, len(in_class))

        canvas = page.locator("#scatter").bounding_box()  # drag a box over the left half: audit cluster 0 only
        page.mouse.move(canvas["x"] + 1, canvas["y"] + 1)
        page.mouse.down()
        page.mouse.move(canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] - 1, steps=5)
        page.mouse.up()
        wait_total(page, len(truth["members"][0][0]))
        assert set(page.eval_on_selector_all("#gallery figure", "(all) => all.map((f) => f.dataset.key)")) <= set(
            truth["members"][0][0]
        )
        page.screenshot(path=str(ARTIFACTS / "dashboard-selection.png"), full_page=True)
        page.mouse.click(canvas["x"] + 5, canvas["y"] + 5)  # a click clears the selection
        wait_total(page, len(in_class))

        page.click("[data-page=last]")  # paging reaches the last image
        wait_until(page, f"document.getElementById('gallery').dataset.page === '{(len(in_class) - 1) // 48}'")
        keys = page.eval_on_selector_all("#gallery figure", "(all) => all.map((f) => f.dataset.key)")
        assert keys[-1] == catalog.keys[in_class[-1]] and len(keys) == len(in_class) - 48 * ((len(in_class) - 1) // 48)
        n_pages = (len(in_class) - 1) // 48 + 1
        assert page.url.endswith(f"?page={n_pages}")  # 1-based in the address, as on screen
        page.goto(page.url)  # the address restores the page: its gallery comes with the HTML
        wait_until(page, f"document.getElementById('gallery').dataset.page === '{(len(in_class) - 1) // 48}'")
        assert page.eval_on_selector_all("#gallery figure", "(all) => all.map((f) => f.dataset.key)") == keys
        page.goto(f"{url}/class/0?page=999")  # past the end: the last page
        wait_until(page, f"document.getElementById('gallery').dataset.page === '{(len(in_class) - 1) // 48}'")
        page.goto(f"{url}/class/0?page=2")  # page 2 is the second page: images 49 to 96
        wait_until(page, "document.getElementById('gallery').dataset.page === '1'")
        assert f"page 2 of {n_pages}" in page.inner_text("#status") and page.url.endswith("?page=2")
        assert page.eval_on_selector("#gallery figure", "(f) => f.dataset.key") == catalog.keys[in_class[48]]
        for old_link in ("?page=0", "?page=1", "?page=-3"):  # a link made when the address was 0-based: the first page
            page.goto(f"{url}/class/0{old_link}")
            wait_until(page, "document.getElementById('gallery').dataset.page === '0'")
            assert page.eval_on_selector("#gallery figure", "(f) => f.dataset.key") == catalog.keys[in_class[0]]
        page.goto(f"{url}/class/0")
        wait_total(page, len(in_class))

        page.click("a[data-cluster='1']")  # a cluster of the prototypes filters the gallery
        wait_total(page, len(truth["members"][0][1]))
        page.check("#view-heatmap")
        wait_until(page, "[...document.querySelectorAll('#gallery img')].every((i) => i.src.includes('view=heatmap'))")
        assert min(wait_images(page, "#gallery img")) > 5

        page.click("#gallery figure a >> nth=0")
        page.wait_for_url(f"{url}/image?key=*")
        contrast = wait_images(page, ".gallery.large .tile img")
        assert len(contrast) == 2 + catalog.run.n_targets and min(contrast) > 1
        image_key = truth["members"][0][1][0]
        assert page.inner_text("h1") == image_key
        # each map shows its colour scale: a colour bar between -s and +s, s its largest |value|
        row = catalog.run.rows_of([image_key])
        attention = catalog.run.read_rows("attention", row)[0].astype(np.float32).mean(axis=0)
        scales = [float(np.abs(attention - attention.min()).max())] + [
            float(np.abs(m).max()) for m in catalog.run.read_rows("cdam", row)[0]
        ]
        shown = page.eval_on_selector_all(
            ".gallery.large .map .scale", "(all) => all.map((s) => s.innerText.replace(/\\s+/g, ' ').trim())"
        )
        assert shown == [f"−{s:.3g} +{s:.3g}" for s in scales]
        assert min(wait_images(page, ".scale img")) > 5 and page.get_attribute(".scale img", "src") == "/colorbar.png"
        page.screenshot(path=str(ARTIFACTS / "dashboard-image.png"), full_page=True)

        assert watch.errors == [], watch.errors
        assert watch.foreign_requests(url + "/") == []
        assert len(watch.requests) > 100
        page.close()
        page = browser.new_page()  # a bad filter in the address: the API's one-line error on the page
        page.goto(f"{url}/class/0?cluster=abc")
        wait_until(page, "document.getElementById('status').textContent.includes('cluster: expected an integer')")
        page.close()

        for path in (
            "/static/../../../etc/passwd",
            "/static/..%2F..%2F..%2Fetc%2Fpasswd",
            "/static/%2e%2e/app.py",
            "/../../etc/passwd",
            "/tile?key=..%2F..%2Fmanifest.json&view=input&map=att&size=160",
            "/image?key=..%2Fmanifest.json",
            "/contact-sheet?class=..%2F..%2Fetc",
            "/class/99",
            "/nothing-here",
        ):
            status, body = raw_get(url, path)
            assert status == 404, (path, status, body)
            assert b"root:" not in body and len(body.splitlines()) == 1
        assert get(url + "/tile?key=" + quote(catalog.keys[0]) + "&view=input&map=att&size=161")[0] == 400
        assert get(url + "/tile?key=" + quote(catalog.keys[0]) + "&view=input&map=c77&size=160")[0] == 400
        status, _ = raw_get(url, "/")
        assert status == 200


def test_dashboard_with_a_token_in_a_browser(browser, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: ANN001
    """The dashboard behind a token (issue 21), in Chromium, over a run whose class names, keys and sample json
    are HTML and script payloads: the printed address sets the cookie and loses its token, every page and
    picture then loads on the cookie alone, and no payload becomes an element; without the cookie, or under
    another host name that resolves to 127.0.0.1 (DNS rebinding), a one-line 403."""
    import secrets

    dest = tmp_path_factory.mktemp("hostile") / "run"
    keys = write_hostile_run(dest)["keys"]
    token = secrets.token_urlsafe(32)
    with serving(str(dest), token=token) as url:
        port = urlparse(url).port
        context = browser.new_context(viewport={"width": 1300, "height": 1000})
        page = context.new_page()
        watch = PageWatch(page)
        refused = []
        page.on("response", lambda answer: answer.status >= 400 and refused.append((answer.status, answer.url)))
        page.goto(f"{url}/?token={token}")
        assert page.url == url + "/"  # the token left the address (and the history)
        cookies = [(c["name"], c["value"], c["httpOnly"], c["sameSite"]) for c in context.cookies()]
        assert cookies == [(f"cdam-token-{port}", token, True, "Strict")]
        assert page.evaluate("document.cookie") == ""  # HttpOnly: no script of the page can read it
        assert HOSTILE_CLASS_NAMES[0] in page.inner_text("body") and page.evaluate(HOSTILE_ELEMENTS_JS) == 0
        for c in (0, 1):
            page.goto(f"{url}/class/{c}")
            assert page.inner_text("h1").startswith(f"Class {HOSTILE_CLASS_NAMES[c]}")
            assert min(wait_images(page, "#gallery img")) > 1
            assert page.evaluate(HOSTILE_ELEMENTS_JS) == 0 and page.evaluate("window.pwned === undefined")
        page.click("#gallery figure a >> nth=0")
        page.wait_for_url(f"{url}/image?key=*")
        contrast = wait_images(
            page, ".gallery.large .tile img"
        )  # the input (a flat grey square here), the attention, 3 maps
        assert page.inner_text("h1") in keys and len(contrast) == 5 and min(contrast[1:]) > 1
        assert HOSTILE_JSON in page.inner_text("table.record")
        assert page.evaluate(HOSTILE_ELEMENTS_JS) == 0 and page.evaluate("window.pwned === undefined")
        page.screenshot(path=str(ARTIFACTS / "dashboard-hostile-image.png"), full_page=True)
        assert watch.errors == [] and refused == [] and watch.foreign_requests(url + "/") == []
        context.close()

        stranger = browser.new_page()  # no cookie
        rebinding = f"http://{REBINDING_HOST}:{port}/?token={token}"  # the right token under a foreign name
        for address in (f"{url}/", f"{url}/class/0", f"{url}/?token=not-{token}", rebinding):
            response = stranger.goto(address)
            text = stranger.inner_text("body")
            assert response.status == 403 and len(text.strip().splitlines()) == 1, (address, text)
            assert HOSTILE_CLASS_NAMES[0] not in text and "synthetic-" not in text
        assert stranger.context.cookies() == []
        stranger.close()


def test_report_in_a_browser(audited_run: tuple[str, dict], browser, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    dest, truth = audited_run
    out = tmp_path / "report.html"
    assert main(["report", dest, "-o", str(out), "--classes", "2", "--per-class", "6"]) == 0
    assert "wrote" in capsys.readouterr().err
    html = out.read_text()
    assert "no audit yet" not in html and "<script" not in html
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    watch = PageWatch(page)
    page.goto(out.as_uri())
    sections = page.eval_on_selector_all("section.class", "(all) => all.map((s) => s.id)")
    assert sections == [f"class-{c}" for c in truth["ranked"][:2]]  # the two highest-ranked classes of the audit
    cards = page.eval_on_selector_all("#class-0 .gallery figcaption", "(all) => all.map((c) => c.innerText)")
    assert len(cards) == 6 and "medoid of cluster 0" in cards[0] and "medoid of cluster 1" in cards[4]
    assert cards[0].startswith(truth["members"][0][0][0])
    contrast = wait_images(page, "img:not(.sheet):not(.scale img)")  # (the test's contact sheet is one flat colour)
    n_cards = page.eval_on_selector_all("section.class .gallery figure", "(all) => all.length")
    n_clusters = page.eval_on_selector_all("section.class figure.cluster", "(all) => all.length")
    assert n_cards <= 12 and n_clusters == sum(
        len(truth["members"][c]) - (not truth["members"][c][1]) for c in truth["ranked"][:2]
    )
    assert (
        len(contrast) == 1 + 2 * n_clusters + 2 * n_cards and min(contrast) > 1
    )  # strip medoid, prototypes + medoids, overlay + input
    assert page.eval_on_selector_all("details.sheet img.sheet", "(all) => all.length") == 1
    assert page.eval_on_selector_all(".strip figcaption", "(all) => all.map((c) => c.innerText.split('\\n')[0])") == [
        f"{open_run(dest).class_names[0]} · cluster 1"
    ]
    # the colour bar with numbers: the header's in units of each map's scale, each card's with its own
    assert page.inner_text("header .scale").replace("\n", " ").split() == [
        "−1",
        "+1",
        "×",
        "each",
        "map's",
        "largest",
        "|value|",
    ]
    run = open_run(dest)
    key = cards[0].split("\n")[0]
    scale = float(np.abs(run.maps_for([key], [0])).max())
    assert page.inner_text("#class-0 .gallery figure >> nth=0 >> .scale").split() == [f"−{scale:.3g}", f"+{scale:.3g}"]
    assert page.eval_on_selector_all(".scale img", "(all) => all.length") == 1 + n_cards
    assert "red border</span> = a wrong prediction" in html
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    assert watch.errors == [] and watch.foreign_requests(out.as_uri()) == []
    page.close()


def overlay_rows(picture: np.ndarray, left: int, width: int) -> np.ndarray:
    """Rows of the figure whose span [left, left + width) is almost all drawn (not the white background)."""
    drawn = (picture[:, left : left + width] < 250).any(axis=2).mean(axis=1)
    return np.flatnonzero(drawn > 0.9)


def test_show_draws_the_map_with_a_colour_bar(audited_run: tuple[str, dict], tmp_path: Path, capsys) -> None:
    dest, _ = audited_run
    run = open_run(dest)
    records = run.metadata.to_table().slice(0, 40).to_pylist()
    maps = run.maps_for([r["key"] for r in records], list(range(len(run.class_names))))
    own = maps[np.arange(len(records)), [r["pred"] for r in records]]
    record = records[int(np.argmax(own.max(axis=(1, 2)) / np.abs(own).max(axis=(1, 2))))]  # its largest value is +scale
    out = tmp_path / "show.png"
    assert main(["show", dest, "--key", record["key"], "-o", str(out), "--size", "256"]) == 0
    assert f"class {run.class_names[record['pred']]}" in capsys.readouterr().err
    picture = np.asarray(Image.open(out).convert("RGB")).astype(np.int32)
    height, width, _ = picture.shape
    assert (
        256 + 30 <= height <= 256 + 120 and 256 + 30 <= width <= 256 + 150
    )  # the picture, a title above, a colour bar beside
    rows = overlay_rows(picture, 8, 256)
    assert len(rows) == 256 and np.all(np.diff(rows) == 1), "the overlay is a 256-pixel square below the title"
    top = rows[0]
    overlay = picture[top : top + 256, 8 : 8 + 256]
    bar = picture[top : top + 256, 8 + 256 + 8 + 6]  # the middle column of the colour bar
    assert (
        np.abs(bar[1] - [103, 0, 31]).max() < 12 and np.abs(bar[-2] - [5, 48, 97]).max() < 12
    )  # +scale deep red, -scale deep blue
    assert np.abs(bar[128] - [247, 247, 247]).max() < 20  # 0 near white
    assert (bar[1:128, 0] > bar[1:128, 2]).all() and (bar[129:-1, 0] < bar[129:-1, 2]).all()  # warm above 0, cool below
    from cdam_worker.views.tiles import TileRenderer

    tiles = TileRenderer(run)
    plain = tiles.model_view_image(record["key"], 256).astype(np.int32)
    gh, gw = run.grid
    slot = record["targets"].index(record["pred"])
    y, x = divmod(record["relevance_argmax"][slot], gw)
    hot = overlay[int((y + 0.5) * 256 / gh), int((x + 0.5) * 256 / gw)]
    assert hot[0] > hot[2] + 30, f"the strongest positive token should be red in the overlay, got {hot}"
    assert np.abs(overlay - plain).mean() > 3, "the overlay looks like the plain image"
    tiles.close()


def test_show_refuses_what_it_cannot_draw_in_one_line(audited_run: tuple[str, dict], tmp_path: Path, capsys) -> None:
    dest, _ = audited_run
    key = open_run(dest).index.column("key")[0].as_py()
    names = ", ".join(
        open_run(dest).metadata.to_table(columns=["key", "target_names"]).slice(0, 1).column("target_names")[0].as_py()
    )
    for argv, text in (
        (["--key", "no-such-key"], "key 'no-such-key' is not an explained image"),
        (
            ["--key", key, "--target", "unicorn"],
            f"class 'unicorn': unknown class name 'unicorn' (nor a concept of key {key!r}: its targets are {names}; derived maps: none)",
        ),
        (["--key", key, "--size", "5"], "--size 5"),
    ):
        assert main(["show", dest, *argv, "-o", str(tmp_path / "x.png")]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("cdam show: error:") and text in error[0], error
    assert error[0] == "cdam show: error: --size 5: expected 32 to 4096 pixels"
    assert main(["show", dest, "--key", key, "--target", "unicorn", "-o", str(tmp_path / "x.png")]) == 2
    assert (
        capsys.readouterr().err
        == f"cdam show: error: class 'unicorn': unknown class name 'unicorn' (nor a concept of key {key!r}: its targets are {names}; derived maps: none)\n"
    )
    assert not (tmp_path / "x.png").exists()


def test_show_draws_a_concept_that_derive_wrote(demo_run: str, tmp_path: Path, capsys) -> None:
    import torch

    from cdam_worker import Concept

    dest = str(tmp_path / "run")
    shutil.copytree(demo_run, dest)
    run = open_run(dest)
    keys = run.index.column("key").to_pylist()[:8]
    vector = run.read_rows("embedding", run.rows_of(keys)).mean(axis=0)  # the README's recipe for a concept file
    Concept("mark", torch.from_numpy(vector)).save(tmp_path / "mark.pt")
    assert (
        main(
            [
                "derive",
                dest,
                "--targets",
                "classes:circle",
                "--concepts",
                f"mark={tmp_path / 'mark.pt'}",
                "--name",
                "marks",
            ]
        )
        == 0
    )
    capsys.readouterr()
    key = keys[3]
    expected = derive_maps(open_run(dest), "none", keys=[key], concepts=[f"mark={tmp_path / 'mark.pt'}"]).values[0, 0]
    scale = float(np.abs(expected).max())
    pictures = []
    for target in ("mark", "marks/mark"):
        out = tmp_path / f"{target.replace('/', '-')}.png"
        assert main(["show", dest, "--key", key, "--target", target, "-o", str(out), "--size", "128"]) == 0
        assert capsys.readouterr().err == f"{out}: concept mark, derived marks, map scale ±{scale:.3g}\n"
        pictures.append(np.asarray(Image.open(out).convert("RGB")))
    assert np.array_equal(*pictures)
    plain = tmp_path / "plain.png"  # the run's own map of circle, not the derived one: the run's slots come first
    assert main(["show", dest, "--key", key, "--target", "circle", "-o", str(plain), "--size", "128"]) == 0
    assert "derived" not in capsys.readouterr().err
    assert main(["show", dest, "--key", key, "--target", "marks/circle", "-o", str(plain), "--size", "128"]) == 0
    assert "class circle (0), derived marks" in capsys.readouterr().err
    assert main(["show", dest, "--key", key, "--target", "other/mark", "-o", str(plain)]) == 2
    assert (
        capsys.readouterr().err
        == f"cdam show: error: --target 'other/mark': {dest} has no derived maps named 'other' (derived: marks)\n"
    )
    assert main(["show", dest, "--key", key, "--target", "shape", "-o", str(plain)]) == 2
    assert capsys.readouterr().err.endswith("derived maps: marks)\n")


def test_export_fiftyone_writes_images_heatmaps_and_clusters(
    audited_run: tuple[str, dict], tmp_path: Path, capsys
) -> None:
    dest, truth = audited_run
    run = open_run(dest)
    out = tmp_path / "fo"
    assert main(["export-fiftyone", dest, str(out)]) == 0
    assert "fo.Dataset.from_dir" in capsys.readouterr().err
    samples = json.loads((out / "samples.json").read_text())["samples"]
    metadata = json.loads((out / "metadata.json").read_text())
    assert (
        "version" not in metadata
        and metadata["media_type"] == "image"
        and metadata["info"]["classes"] == run.class_names
    )
    assert len(samples) == run.index.num_rows
    flagged = set(truth["members"][0][1])
    pred_of = dict(zip(run.index.column("key").to_pylist(), run.index.column("pred").to_pylist()))
    cluster_of = {key: k for c in truth["members"].values() for k, keys in c.items() for key in keys}
    _, height, width = run.attrs["input_size"]
    for sample in samples[:40]:
        assert not Path(sample["filepath"]).is_absolute() and Image.open(out / sample["filepath"]).size == (
            width,
            height,
        )
        row = sample["row"]
        maps = run.read_rows("cdam", np.asarray([row]))[0].astype(np.float32)
        for slot in range(run.n_targets):
            heatmap = sample[f"cdam_{slot}"]
            assert heatmap["_cls"] == "Heatmap" and set(heatmap) == {"_cls", "map", "range"}  # no file path to break
            values = fiftyone_array(heatmap["map"])
            assert values.dtype == np.float32 and np.array_equal(values, maps[slot])  # the exact signed map
            scale = float(np.abs(maps[slot]).max())
            assert heatmap["range"] == [-scale, scale]
            assert sample[f"cdam_{slot}_target"] == run.class_names[slot]  # --targets all: slot k is class k
        attention = run.read_rows("attention", np.asarray([row]))[0].astype(np.float32).mean(axis=0)
        stored = fiftyone_array(sample["attention"]["map"])
        assert np.allclose(stored, attention - attention.min()) and stored.min() == 0
        assert sample["attention"]["range"] == [0.0, float(stored.max())]
        assert sample["prediction"]["label"] == run.class_names[pred_of[sample["key"]]]
        assert (f"cluster-{cluster_of[sample['key']]}" in sample["tags"]) == (sample["key"] in cluster_of)
        assert ("audit-flagged" in sample["tags"]) == (sample["key"] in flagged)
    assert main(["export-fiftyone", dest, str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err


def fiftyone_array(serialised: dict) -> np.ndarray:
    """An array as FiftyOne's JSON format stores it: base64 of zlib-compressed .npy bytes."""
    return np.load(io.BytesIO(zlib.decompress(base64.b64decode(serialised["$binary"]["base64"]))), allow_pickle=False)


def fiftyone_alpha(values: np.ndarray, value_range: list[float]) -> np.ndarray:
    """The opacity FiftyOne's App paints a Heatmap value with, colouring by field (its looker's heatmap painter:
    a value of 0 is not painted; else opacity min(max, |v|) / max, max the larger |end| of the range)."""
    top = max(abs(value_range[0]), abs(value_range[1]))
    return np.where(values == 0, 0.0, np.minimum(top, np.abs(values)) / top)


FIFTYONE_VENV = Path(__file__).resolve().parents[1] / ".venv-fiftyone"
"""Where `.ci/run` installs fiftyone (tests/requirements-fiftyone.txt), in a venv of its own: it pins starlette<1.4
and brings about 80 packages and a MongoDB server, none of which cdam needs."""
FIND_FIFTYONE = "import importlib.util; spec = importlib.util.find_spec('fiftyone'); print(spec.submodule_search_locations[0] if spec else '')"


def fiftyone_python() -> tuple[str, Path] | None:
    """An interpreter with fiftyone (``CDAM_FIFTYONE_PYTHON``, else the repository's .venv-fiftyone, else this one)
    and fiftyone's package folder; None where none has it."""
    import subprocess
    import sys

    candidates = [os.environ.get("CDAM_FIFTYONE_PYTHON"), str(FIFTYONE_VENV / "bin" / "python"), sys.executable]
    for python in filter(None, candidates):
        if Path(python).exists():
            found = subprocess.run([python, "-c", FIND_FIFTYONE], capture_output=True, text=True, timeout=120)
            if found.returncode == 0 and found.stdout.strip():
                return python, Path(found.stdout.strip())
    return None


@contextlib.contextmanager
def fiftyone_database(folder: Path, package: Path) -> Iterator[str]:
    """FiftyOne's own MongoDB (the mongod its fiftyone-db package ships, below fiftyone's ``package`` folder) on a
    free loopback port, started here with time to start on a loaded machine (FiftyOne waits 60 s for the one it
    starts itself)."""
    import socket
    import subprocess

    mongod = package / "db" / "bin" / "mongod"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder.mkdir(parents=True)
    server = subprocess.Popen(
        [
            str(mongod),
            "--dbpath",
            str(folder),
            "--logpath",
            str(folder / "mongo.log"),
            "--port",
            str(port),
            "--bind_ip",
            "127.0.0.1",
            "--nounixsocket",
        ]
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert server.poll() is None and time.monotonic() < deadline, (
                f"mongod did not start: {(folder / 'mongo.log').read_text()[-2000:]}"
            )
            time.sleep(0.2)
        yield f"mongodb://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(60)


FIFTYONE_IMPORT = """
import json, os, sys
import fiftyone as fo
dataset = fo.Dataset.from_dir(sys.argv[1], fo.types.FiftyOneDataset)
fields = [name for name, field in dataset.get_field_schema().items() if getattr(field, "document_type", None) is fo.Heatmap]
rows = [{"key": sample["key"], "filepath": sample.filepath, "exists": os.path.isfile(sample.filepath),
         "maps": {name: {"map": sample[name].get_map().tolist(), "dtype": str(sample[name].get_map().dtype), "range": list(sample[name].range)}
                  for name in fields if sample[name] is not None}} for sample in dataset.iter_samples()]
dataset.delete()
print(json.dumps(rows))
"""


def test_a_moved_fiftyone_export_imports_in_fiftyone_with_transparent_zero_relevance(
    audited_run: tuple[str, dict], tmp_path: Path, capsys
) -> None:
    import subprocess

    fiftyone = fiftyone_python()
    if fiftyone is None:
        missing = f"fiftyone is not installed here nor in {FIFTYONE_VENV} (.ci/run installs it there)"
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    python, package = fiftyone
    dest, _ = audited_run
    run = open_run(dest)
    assert main(["export-fiftyone", dest, str(tmp_path / "written")]) == 0
    moved = tmp_path / "elsewhere" / "fo"
    moved.parent.mkdir()
    shutil.move(tmp_path / "written", moved)  # the folder moved (or copied to another machine) before the import
    with fiftyone_database(tmp_path / "fiftyone-db", package) as uri:
        env = {
            **os.environ,
            "FIFTYONE_DATABASE_URI": uri,
            "FIFTYONE_DATABASE_VALIDATION": "false",
            "FIFTYONE_DO_NOT_TRACK": "true",
        }
        done = subprocess.run(
            [python, "-c", FIFTYONE_IMPORT, str(moved)],
            capture_output=True,
            text=True,
            timeout=500,
            env=env,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(imported) == run.index.num_rows
    rows = dict(zip(run.index.column("key").to_pylist(), run.index.column("row").to_pylist()))
    lowest = []
    for sample in imported:
        assert sample["exists"] and Path(sample["filepath"]).is_relative_to(moved)
        maps = run.read_rows("cdam", np.asarray([rows[sample["key"]]]))[0].astype(np.float32)
        assert sorted(sample["maps"]) == ["attention", *(f"cdam_{k}" for k in range(run.n_targets))]
        for slot in range(run.n_targets):
            heatmap = sample["maps"][f"cdam_{slot}"]
            values = np.asarray(heatmap["map"], dtype=np.float32)
            scale = float(np.abs(maps[slot]).max())
            assert (
                heatmap["dtype"] == "float32"
                and np.array_equal(values, maps[slot])
                and heatmap["range"] == [-scale, scale]
            )
            alpha = fiftyone_alpha(values, heatmap["range"])
            assert np.allclose(alpha, np.abs(maps[slot]) / scale)  # opacity grows with |relevance|, whatever its sign
            lowest.append(alpha.min())
        attention = sample["maps"]["attention"]
        assert (
            fiftyone_alpha(np.asarray(attention["map"]), attention["range"]).min() == 0
        )  # its minimum token: not painted
    assert (
        max(lowest) < 0.5 and np.median(lowest) < 0.02
    )  # the least relevant token of each map shows the image through (0.5 before)
    from cdam_worker.views.fiftyone import heatmap

    nothing = heatmap(np.where(np.eye(*run.grid, dtype=bool), np.nan, 0.0))  # no relevance at all (NaN tokens too)
    assert (
        nothing["range"] == [-1.0, 1.0]
        and (fiftyone_alpha(fiftyone_array(nothing["map"]), nothing["range"]) == 0).all()
    )


def test_views_on_a_damaged_run_say_what_they_skipped_and_do_the_rest(demo_run: str, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "damaged"
    damage = damage_run(demo_run, dest)
    catalog = Catalog(open_run(str(dest)))
    nan_key = damage["nan_keys"][0]
    good_key = next(k for k in catalog.keys if k not in damage["nan_keys"] and k not in damage["unreadable_keys"])
    with serving(str(dest)) as url:
        status, body = get(url + "/")
        text = body.decode()
        assert status == 200
        assert f"shard {damage['skipped_shard']}: no completion marker" in text and "(not complete)" in text
        assert "broken-sample" in text and "cannot identify image file" in text
        assert "no audit yet: run `cdam audit" in text and "<dt>variant</dt><dd>vanilla</dd>" in text
        status, body = get(url + "/class/0")
        assert status == 200 and "no audit yet: run `cdam audit" in body.decode()
        gallery = json.loads(get(url + "/api/gallery?class=0&limit=500")[1])
        assert gallery["total"] == int(((catalog.preds == 0) | (catalog.labels == 0)).sum())
        assert gallery["items"] and all(item["row"] < damage["skipped_first_row"] for item in gallery["items"])
        status, body = get(url + "/image?key=" + quote(nan_key))
        assert status == 200 and "were not written" in body.decode()
        status, body = get(url + f"/tile?key={quote(nan_key)}&view=overlay&map=c0&size=160")
        size, _ = png_stats(body)
        grey = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
        assert (
            status == 200 and (np.abs(grey.astype(int) - 225).max(axis=2) < 3).mean() > 0.8
        )  # the 'no map' placeholder
        status, body = get(url + f"/tile?key={quote(good_key)}&view=overlay&map=c0&size=160")
        assert status == 200 and png_stats(body)[1] > 5
        assert get(url + "/api/scatter?class=0")[1].decode().count("no audit yet") == 1
        lost = damage["unreadable_keys"][0]
        status, body = get(url + "/image?key=" + quote(lost))
        assert status == 200 and "moved-away.tar" in body.decode()  # the reason names the shard it could not read
        status, body = get(url + f"/tile?key={quote(lost)}&view=overlay&map=c0&size=160")
        assert (
            status == 200
            and (
                np.abs(np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int) - 225).max(axis=2) < 3
            ).mean()
            > 0.8
        )

    report = tmp_path / "report.html"
    assert main(["report", str(dest), "-o", str(report), "--classes", "4", "--per-class", "70"]) == 0
    err = capsys.readouterr().err
    assert f"note: shard {damage['skipped_shard']}: no completion marker" in err and "no stored map" in err
    html = report.read_text()
    assert "no audit yet: run `cdam audit" in html and "no stored map of their class" in html

    assert main(["show", str(dest), "--key", nan_key, "-o", str(tmp_path / "nan.png")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "its maps were not written" in lines[-1] and any("no completion marker" in line for line in lines[:-1])
    assert main(["show", str(dest), "--key", good_key, "-o", str(tmp_path / "good.png")]) == 0
    assert main(["show", str(dest), "--key", lost, "-o", str(tmp_path / "lost.png")]) == 2
    assert "moved-away.tar" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["export-fiftyone", str(dest), str(tmp_path / "fo")]) == 0
    err = capsys.readouterr().err
    assert (
        f"left out: {len(damage['unreadable_keys'])} unreadable image(s)" in err and "map(s) not written (NaN)" in err
    )
    samples = json.loads((tmp_path / "fo" / "samples.json").read_text())["samples"]
    assert len(samples) == len(catalog.keys) - len(damage["unreadable_keys"])
    assert all("cdam_0" not in s for s in samples if s["key"] in damage["nan_keys"])


def test_views_on_s3_retry_transient_faults(
    audited_run: tuple[str, dict], s3_server: str, s3_bucket: str, s3_client, tmp_path: Path, monkeypatch
) -> None:  # noqa: ANN001
    from helpers import S3Proxy

    source, _ = audited_run
    for path in Path(source).rglob("*"):
        if path.is_file():
            s3_client.upload_file(str(path), s3_bucket, f"runs/demo/{path.relative_to(source).as_posix()}")
    dest = f"s3://{s3_bucket}/runs/demo"
    with S3Proxy(s3_server, fail_every=4, fault="503") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with serving(dest) as url:
            key = open_run(source).index.column("key")[3].as_py()
            pages = [
                get(url + path)
                for path in (
                    "/",
                    "/class/0",
                    "/image?key=" + quote(key),
                    "/api/gallery?class=0",
                    "/contact-sheet?class=0&cluster=1",
                )
            ]
            assert [status for status, _ in pages] == [200] * 5
            assert "flagged" in pages[0][1].decode()
            status, tile = get(url + f"/tile?key={quote(key)}&view=overlay&map=c0&size=160")
            assert status == 200 and png_stats(tile)[1] > 5
            for _, body in pages:
                assert TEST_SECRET.encode() not in body and TEST_ACCESS_KEY.encode() not in body
        assert main(["report", dest, "-o", str(tmp_path / "r.html"), "--classes", "1", "--per-class", "4"]) == 0
        assert main(["show", dest, "--key", key, "-o", str(tmp_path / "s.png")]) == 0
        assert main(["export-fiftyone", dest, str(tmp_path / "fo")]) == 0
    assert proxy.failed >= 5
    html = (tmp_path / "r.html").read_text()
    assert TEST_SECRET not in html and TEST_ACCESS_KEY not in html and "flagged" in html
    assert Image.open(tmp_path / "s.png").size[0] > 512
