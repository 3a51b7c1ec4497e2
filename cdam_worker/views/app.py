"""The ``cdam serve`` dashboard: a read-only Starlette app over one run.

Pages: ``/`` (overview), ``/class/<index>`` (a class's gallery, filters, the audit's 2-D plot and
prototypes), ``/image?key=KEY`` (every stored map of an image). A class page carries its first gallery
page (whose tiles the server starts rendering as it answers); further pages, the plot and the tiles come
from ``/api/...`` and ``/tile`` and are drawn by ``static/app.js``. A guard (``guard.py``) answers only
requests to this server's own Host names, with its token where one is set. Only GET exists; every key,
class, map and file name is checked against the run (or a fixed list) before use, so nothing outside the
run can be named; unknown things get a one-line 404. A Content-Security-Policy keeps pages from loading
anything but this server's own files.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from cdam_worker.reading import Run, RunError
from cdam_worker.storage import StorageError
from cdam_worker.views import pages
from cdam_worker.views.catalog import Catalog, GalleryQuery
from cdam_worker.views.colormap import colorbar, symmetric_scale
from cdam_worker.views.guard import Guard
from cdam_worker.views.render import display_size, encode
from cdam_worker.views.render import tile as render_tile
from cdam_worker.views.tiles import SIZES, TileRenderer, check_view

GALLERY_PAGE = 48
GALLERY_TILE = 160
IMAGE_TILE = 256
CACHE_BYTES = 512 << 20
"""The default bound of the tile renderer's caches (decoded images, maps, encoded tiles) together."""
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
PICTURE_CACHING = {"cache-control": "private, max-age=3600"}
"""A picture of a key never changes while the run is served: the browser may keep it (pages and data: no-store)."""
HEAD = '<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/style.css"><script src="/static/app.js" defer></script>'


def static_file(name: str) -> bytes:
    """A file of the dashboard's front end (``cdam_worker/views/static``)."""
    return importlib.resources.files("cdam_worker.views").joinpath("static", name).read_bytes()


class Dashboard:
    """The dashboard's endpoints over one run."""

    def __init__(self, run: Run, cache_bytes: int = CACHE_BYTES) -> None:
        self.run = run
        self.catalog = Catalog(run)
        # JPEG: a fifth of a PNG's bytes, a tenth of its encoding time
        self.tiles = TileRenderer(run, image_format="JPEG", cache_bytes=cache_bytes)
        self.static = {name: static_file(name) for name in STATIC_FILES}

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Once the server listens, render a first tile (one-time costs paid before a page asks) and index
        where each image lies in its shard (the run's members tables, or for an older run a scan of the tar
        headers) in the background, so that the images of a class page come with one ranged read each."""
        threading.Thread(target=self._prepare, name="cdam-prepare", daemon=True).start()
        yield

    def _prepare(self) -> None:
        started = time.perf_counter()
        try:
            self.tiles.warm_up()
            shards = self.run.index_images()
        except (RunError, StorageError, OSError) as error:
            print(f"note: preparing the pictures (a first tile, the shards' index): {error}", file=sys.stderr)
            return
        print(
            f"indexed the images of {shards} shard(s) in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    # -- pages ----------------------------------------------------------------------------------

    def overview(self, request: Request) -> Response:
        facts = self.catalog.overview()
        errors, n_errors = self.catalog.errors()
        medoids = self.catalog.flagged_medoids()
        strip = pages.medoid_strip(
            medoids,
            lambda m: self._tile_src(m["medoid_key"], "overlay", f"c{m['class']}", GALLERY_TILE),
            lambda c: f"/class/{c}",
        )
        body = pages.overview(
            facts,
            self.catalog.class_counts(),
            self.catalog.leaderboard(),
            errors,
            n_errors,
            self.catalog.no_audit,
            lambda c: f"/class/{c}",
            strip,
        )
        return self._page(
            "cdam: overview", f'<header><h1>cdam run</h1><p class="muted">{escape(pages.LEGEND)}</p></header>{body}'
        )

    def class_page(self, request: Request) -> Response:
        c = self._class(request.path_params["index"])
        name = self.catalog.class_names[c]
        clusters = self.catalog.clusters(c)
        self.tiles.render_ahead(
            [k["medoid_key"] for k in clusters if k["medoid_key"] in self.catalog.position],
            "overlay",
            f"c{c}",
            GALLERY_TILE,
        )
        parts = [
            f'<nav><a href="/">overview</a> › class {escape(name)}</nav><h1>Class {escape(name)} <span class="muted">({c})</span></h1>',
            pages.notes(self.run.skipped, "warn"),
            pages.class_audit(self.catalog.class_audit_row(c), self.catalog.no_audit),
            pages.prototypes(
                clusters,
                lambda k: f"/prototype?class={c}&amp;cluster={k}&amp;size={GALLERY_TILE}",
                lambda key: self._tile_src(key, "overlay", f"c{c}", GALLERY_TILE),
                lambda k: f"?cluster={k}",
            ),
        ]
        sheets = self.catalog.audit.contact_sheets.get(c, {}) if self.catalog.audit is not None else {}
        parts.append(
            pages.contact_sheets(
                [
                    (f"/contact-sheet?class={c}&amp;cluster={k['cluster']}", k)
                    for k in clusters
                    if k["cluster"] in sheets
                ]
            )
        )
        scatter = (
            '<canvas id="scatter" width="360" height="360" aria-label="2-D plot of the class\'s images"></canvas>'
            '<p class="muted">Drag a box to select images; click once to clear.</p><p id="scatter-legend"></p>'
            if self.catalog.audit is not None
            else pages.notes([self.catalog.no_audit])
        )
        parts.append(
            '<section class="explore"><div class="scatter-box"><h3>Audit: 2-D plot</h3>' + scatter + "</div>"
            '<div class="gallery-box"><form id="filters"></form><p class="muted legend">'
            + pages.WRONG_PREDICTION
            + '</p><p id="status" class="muted"></p>'
            '<div id="gallery" class="gallery"></div><div class="pager" id="pager"></div></div></section>'
        )
        data = {
            "class": c,
            "name": name,
            "classes": self.catalog.class_names,
            "clusters": [k["cluster"] for k in clusters],
            "audit": self.catalog.audit is not None,
            "limit": GALLERY_PAGE,
            "size": GALLERY_TILE,
        }
        params = request.query_params
        preloads = ""
        try:  # the gallery the page opens with comes with it, its tiles rendering already (no API round trip)
            page = (
                max(1, _integer(params.get("page", "1"), "page")) - 1
            )  # 1-based, as on screen (an old ?page=0 is the first)
            data["gallery"] = self._gallery_page(c, params, page * GALLERY_PAGE, GALLERY_PAGE)
            # the browser fetches them while it parses the page, not after the script has built the gallery
            preloads = "".join(
                f'<link rel="preload" as="image" href="{escape(item["tile"])}">' for item in data["gallery"]["items"]
            )
        except HTTPException:
            pass  # a bad filter in the address: the script asks the API, which says what is wrong
        parts.append(pages.json_data("class-data", data))
        return self._page(f"cdam: {name}", "".join(parts), preloads)

    def image_page(self, request: Request) -> Response:
        key = self._key(request.query_params.get("key"))
        record = self.catalog.record(key)
        slots = list(
            zip(record["targets"], record["target_names"], record["relevance_pos_sum"], record["relevance_neg_sum"])
        )
        problems = (
            []
            if self.catalog.maps_written(key)
            else [f"the maps of {key!r} were not written (its Zarr row reads as fill values, NaN): shown as 'no map'"]
        )
        if self.tiles.model_view_image(key, IMAGE_TILE) is None:
            problems.append(self.tiles.unreadable[key])
        tiles = [pages.card(self._tile_src(key, "input", "att", IMAGE_TILE), None, "input (as the model saw it)", None)]
        tiles.append(
            self._image_tile(
                key, "att", f"attention (mean of {self.run.array('attention').shape[1]} heads, above its minimum)"
            )
        )
        for slot, (target, target_name, pos, neg) in enumerate(slots):
            kind = "concept" if target < 0 else f"class {target}"
            tiles.append(
                self._image_tile(
                    key,
                    f"s{slot}",
                    f"{escape(target_name)} ({kind}); positive sum {pages.number(pos)}, negative sum {pages.number(neg)}",
                )
            )
        facts = [
            (name, escape(_shown(value)))
            for name, value in record.items()
            if name not in ("targets", "target_names", "relevance_pos_sum", "relevance_neg_sum", "relevance_argmax")
        ]
        pred_link = f'<a href="/class/{record["pred"]}">{escape(self.catalog.class_names[record["pred"]])}</a>'
        body = (
            f'<nav><a href="/">overview</a> › class {pred_link} › image</nav><h1>{escape(key)}</h1>'
            + pages.notes(problems, "warn")
            + '<form id="view-switch" class="views"></form>'
            + f'<div class="gallery large">{"".join(tiles)}</div><p class="muted">{escape(pages.LEGEND)}</p><h2>Metadata</h2>'
            + pages.table(["column", "value"], [[escape(k), v] for k, v in facts], "record")
            + pages.json_data("image-data", {"key": key})
        )
        return self._page(f"cdam: {key}", body)

    def _image_tile(self, key: str, map_name: str, caption: str) -> str:
        """A map of the image page with its colour scale (±its largest |value|) under it."""
        scale = symmetric_scale(self.tiles.map_values(key, map_name))
        return pages.card(
            self._tile_src(key, "overlay", map_name, IMAGE_TILE),
            None,
            caption + "<br>" + pages.colour_scale("/colorbar.png", scale),
            None,
            "map",
        )

    # -- data and pictures ---------------------------------------------------------------------------

    def gallery(self, request: Request) -> Response:
        params = request.query_params
        c = self._class(params.get("class"))
        offset = max(0, _integer(params.get("offset", "0"), "offset"))
        limit = min(max(1, _integer(params.get("limit", str(GALLERY_PAGE)), "limit")), 500)
        return JSONResponse(self._gallery_page(c, params, offset, limit))

    def _gallery_page(self, c: int, params: Any, offset: int, limit: int) -> dict[str, Any]:
        """A page of class ``c``'s gallery under the filters in ``params``, each item with its tile and
        link; its tiles start rendering in the background (the browser asks for them next)."""
        box = None
        if params.get("box"):
            values = [_number(v, "box") for v in params["box"].split(",")]
            if len(values) != 4:
                raise HTTPException(400, "box: expected x0,y0,x1,y1")
            box = tuple(values)
        query = GalleryQuery(
            class_index=c,
            pred=self._class(params["pred"]) if params.get("pred") else None,
            label=self._class(params["label"]) if params.get("label") else None,
            correct={"yes": True, "no": False}[params["correct"]] if params.get("correct") in ("yes", "no") else None,
            cluster=_integer(params["cluster"], "cluster") if params.get("cluster") else None,
            box=box,
            offset=offset,
            limit=limit,
        )
        view = params.get("view", "overlay")
        self._check(check_view, view)
        result = self.catalog.gallery(query)
        self.tiles.render_ahead([item["key"] for item in result["items"]], view, f"c{c}", GALLERY_TILE)
        for item in result["items"]:
            item["tile"] = self._tile_src(item["key"], view, f"c{c}", GALLERY_TILE, html=False)
            item["href"] = "/image?" + urlencode({"key": item["key"]})
        return result

    def scatter(self, request: Request) -> Response:
        return JSONResponse(self.catalog.scatter(self._class(request.query_params.get("class"))))

    async def tile(self, request: Request) -> Response:
        params = request.query_params
        key = self._key(params.get("key"))
        view, map_name = params.get("view", "overlay"), params.get("map", "att")
        size = _integer(params.get("size", str(GALLERY_TILE)), "size")
        if size not in SIZES:
            raise HTTPException(400, f"size: one of {', '.join(map(str, SIZES))}")
        self._check(check_view, view)
        self._check(self.tiles.check_map, map_name)
        data = self.tiles.cached(key, view, map_name, size)  # answered at once, without a thread hop
        if data is None:
            data = await run_in_threadpool(self.tiles.tile, key, view, map_name, size)
        return Response(data, media_type=self.tiles.media_type, headers=PICTURE_CACHING)

    def prototype(self, request: Request) -> Response:
        params = request.query_params
        c = self._class(params.get("class"))
        cluster = _integer(params.get("cluster", ""), "cluster")
        size = _integer(params.get("size", str(GALLERY_TILE)), "size")
        if size not in SIZES:
            raise HTTPException(400, f"size: one of {', '.join(map(str, SIZES))}")
        found = [k for k in self.catalog.clusters(c) if k["cluster"] == cluster]
        if not found:
            raise HTTPException(404, f"class {c} has no audit cluster {cluster}")
        picture = render_tile("heatmap", None, found[0]["prototype"], display_size(self.tiles.input_size, size))
        return Response(encode(picture), media_type="image/png", headers=PICTURE_CACHING)

    def contact_sheet(self, request: Request) -> Response:
        c = self._class(request.query_params.get("class"))
        cluster = _integer(request.query_params.get("cluster", ""), "cluster")
        sheets = self.catalog.audit.contact_sheets.get(c, {}) if self.catalog.audit is not None else {}
        if cluster not in sheets:
            raise HTTPException(404, f"no contact sheet for cluster {cluster} of class {c}")
        return Response(self.run.storage.get(sheets[cluster]), media_type="image/png", headers=PICTURE_CACHING)

    def colorbar_png(self, request: Request) -> Response:
        from PIL import Image

        return Response(encode(Image.fromarray(colorbar(256, 14, vertical=False))), media_type="image/png")

    def static_route(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.static:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(self.static[name], media_type=STATIC_FILES[name])

    # -- helpers --------------------------------------------------------------------------------

    def _page(self, title: str, body: str, head: str = "") -> HTMLResponse:
        return HTMLResponse(pages.document(title, f"<main>{body}</main>", HEAD + head))

    def _class(self, text: Any) -> int:
        if text is None or text == "":
            raise HTTPException(400, "class: missing")
        try:
            return self.catalog.class_index(int(text) if str(text).lstrip("-").isdigit() else str(text))
        except RunError as error:
            raise HTTPException(404, str(error)) from None

    def _key(self, key: str | None) -> str:
        if not key:
            raise HTTPException(400, "key: missing")
        if key not in self.catalog.position:
            raise HTTPException(404, f"no explained image with key {key!r} in this run")
        return key

    @staticmethod
    def _check(check: Callable[[str], None], value: str) -> None:
        try:
            check(value)
        except RunError as error:
            raise HTTPException(400, str(error)) from None

    @staticmethod
    def _tile_src(key: str, view: str, map_name: str, size: int, html: bool = True) -> str:
        src = "/tile?" + urlencode({"key": key, "view": view, "map": map_name, "size": size}, quote_via=quote)
        return escape(src) if html else src


def _integer(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise HTTPException(400, f"{name}: expected an integer, got {text!r}") from None


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise HTTPException(400, f"{name}: expected numbers, got {text!r}") from None


def _shown(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 400 else text[:400] + "…"


async def _http_error(request: Request, error: HTTPException) -> Response:
    return PlainTextResponse(f"{error.status_code}: {error.detail}\n", status_code=error.status_code)


class SecurityHeaders:
    """ASGI middleware: every response carries the Content-Security-Policy and friends, and is not cached
    by the browser unless it says otherwise (pictures)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = [*headers, *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(
    run: Run,
    bound_host: str = "127.0.0.1",
    allow_hosts: Sequence[str] = (),
    token: str | None = None,
    cache_bytes: int = CACHE_BYTES,
) -> SecurityHeaders:
    """The dashboard of ``run`` as an ASGI app (serve it with uvicorn) behind its guard: it answers only
    requests to the bound address, loopback names and ``allow_hosts`` (Host and Origin), and with a
    ``token`` only requests that carry it (see ``guard.py``). Its pictures' caches hold ``cache_bytes`` at
    most."""
    dashboard = Dashboard(run, cache_bytes)
    routes = [
        Route("/", dashboard.overview),
        Route("/class/{index:int}", dashboard.class_page),
        Route("/image", dashboard.image_page),
        Route("/api/gallery", dashboard.gallery),
        Route("/api/scatter", dashboard.scatter),
        Route("/tile", dashboard.tile),
        Route("/prototype", dashboard.prototype),
        Route("/contact-sheet", dashboard.contact_sheet),
        Route("/colorbar.png", dashboard.colorbar_png),
        Route("/static/{name}", dashboard.static_route),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=dashboard.lifespan)
    app.state.dashboard = dashboard
    return SecurityHeaders(Guard(app, bound_host, allow_hosts, token))
