"""Tiles of a run (an image, its map, or both) rendered at display size and cached in memory.

A map is named by a string: ``c<class>`` (the stored map of that class, NaN where it was not a target
of the image), ``s<slot>`` (target slot ``slot``, concepts included) or ``att`` (the last block's CLS
attention, mean over heads, less its minimum: a nearly uniform attention shows as nearly nothing). Batches are read together: the maps of a page with one chunk-wise read,
its images in a thread pool (one ranged read per image member).
"""

from __future__ import annotations

import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from cdam_worker.reading import Run, RunError
from cdam_worker.views.render import VIEWS, ModelView, display_size, encode, tile

SIZES = (96, 160, 256, 512)
"""Allowed tile sizes (pixels of the longer side)."""
MAP_NAME = re.compile(r"^(?:c(\d{1,6})|s(\d{1,4})|att)$")
IMAGE_THREADS = 8
MISSING = object()
"""What ``ByteLRU.get`` returns for a key it does not hold, where None is a value (an unreadable image)."""


class ByteLRU:
    """A thread-safe least-recently-used cache bounded by the bytes of its values (one value larger than the
    bound is kept alone). ``nbytes`` is what it holds now, ``peak_bytes`` the most it has held after a put."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.peak_bytes = 0
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any, default: Any = None) -> Any:
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key][0]

    def __contains__(self, key: Any) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Any, value: Any, size: int) -> None:
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                self._bytes -= self._items.popitem(last=False)[1][1]
            self.peak_bytes = max(self.peak_bytes, self._bytes)


class TileRenderer:
    """Renders and caches the tiles of one run (the dashboard's and the report's pictures)."""

    def __init__(self, run: Run, image_format: str = "PNG", cache_bytes: int = 512 << 20) -> None:
        self.run = run
        self.image_format = image_format
        self.media_type = {"PNG": "image/png", "JPEG": "image/jpeg"}[image_format]
        self.model_view = ModelView(run.attrs["data_config"])
        height, width = run.attrs["input_size"][1:]
        self.input_size = (int(height), int(width))
        self._images = ByteLRU(cache_bytes // 2)  # (key, size) -> (H, W, 3) uint8, or None if unreadable
        self._maps = ByteLRU(cache_bytes // 8)  # (key, map) -> (gh, gw) float32
        self._tiles = ByteLRU(cache_bytes // 4)  # (key, view, map, size) -> encoded bytes
        self._pool = ThreadPoolExecutor(IMAGE_THREADS, thread_name_prefix="cdam-images")
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="cdam-tiles-ahead")  # pages' tiles, one page at a time
        self._pending: dict[tuple[str, str, str, int], Future[bytes]] = {}  # tiles being rendered ahead
        self._pending_lock = threading.Lock()
        self.unreadable: dict[str, str] = {}  # key -> why its image could not be read

    @property
    def caches(self) -> dict[str, ByteLRU]:
        """The renderer's caches by what they hold (their bounds add up to ``cache_bytes`` or less)."""
        return {"images": self._images, "maps": self._maps, "tiles": self._tiles}

    def check_map(self, name: str) -> None:
        """RunError unless ``name`` names a map this run has."""
        match = MAP_NAME.match(name)
        if match is None:
            raise RunError(f"map {name!r}: expected c<class>, s<slot> or att")
        if match.group(1) is not None and int(match.group(1)) >= len(self.run.class_names):
            raise RunError(f"map {name!r}: the run has {len(self.run.class_names)} classes")
        if match.group(2) is not None and int(match.group(2)) >= self.run.n_targets:
            raise RunError(f"map {name!r}: the run stores {self.run.n_targets} target slots")

    def prefetch(self, keys: Sequence[str], map_name: str, size: int) -> None:
        """Read what the tiles of ``keys`` need and is not cached: their maps at once, their images in parallel."""
        missing_maps = [key for key in dict.fromkeys(keys) if (key, map_name) not in self._maps]
        if missing_maps:
            for key, values in zip(missing_maps, self._read_maps(missing_maps, map_name)):
                self._maps.put((key, map_name), values, values.nbytes)
        self._prefetch_images(keys, size)

    def _prefetch_images(self, keys: Sequence[str], size: int) -> None:
        missing_images = [key for key in dict.fromkeys(keys) if (key, size) not in self._images]
        for key, picture in zip(
            missing_images, self._pool.map(lambda key: self._read_image(key, size), missing_images)
        ):
            self._images.put((key, size), picture, 64 if picture is None else picture.nbytes)

    def render_ahead(self, keys: Sequence[str], view: str, map_name: str, size: int) -> None:
        """Render the tiles of ``keys`` in the background (a gallery page's, which the browser asks for next):
        their maps read at once, their images and tiles in parallel. A request for one of them waits for it."""
        with self._pending_lock:
            todo = [(key, view, map_name, size) for key in dict.fromkeys(keys)]
            todo = [tile_key for tile_key in todo if tile_key not in self._pending and tile_key not in self._tiles]
            futures = {tile_key: Future() for tile_key in todo}
            self._pending.update(futures)
        if todo:
            self._ahead.submit(self._render_page, futures)

    def cached(self, key: str, view: str, map_name: str, size: int) -> bytes | None:
        """The encoded tile if it is already rendered, else None."""
        return self._tiles.get((key, view, map_name, size))

    def tile(self, key: str, view: str, map_name: str, size: int) -> bytes:
        """The encoded tile (PNG or JPEG) of an explained image."""
        tile_key = (key, view, map_name, size)
        with self._pending_lock:  # before the cache: a tile leaves _pending only once it is in the cache
            pending = self._pending.get(tile_key)
        if pending is not None:
            try:
                return pending.result()
            except Exception:  # noqa: BLE001 - rendered again here, where its error reaches the caller
                pass
        data = self.cached(key, view, map_name, size)
        return data if data is not None else self._render(tile_key)

    def _render(self, tile_key: tuple[str, str, str, int]) -> bytes:
        """Render a tile from what is cached, reading what is not here, in this thread: a thread of the image
        pool that waited on the pool for an image evicted since the page's prefetch could, with the others
        doing the same, wait forever."""
        key, view, map_name, size = tile_key
        picture = tile(view, self._image(key, size), self._map(key, map_name), display_size(self.input_size, size))
        data = encode(picture, self.image_format)
        self._tiles.put(tile_key, data, len(data))
        return data

    def _render_page(self, futures: dict[tuple[str, str, str, int], Future[bytes]]) -> None:
        """Background: render a page's tiles, each handed to its future as it is done."""
        try:
            _, _, map_name, size = next(iter(futures))
            self.prefetch([key for key, *_ in futures], map_name, size)
            rendered = self._pool.map(self._render, futures)
            for future in futures.values():
                future.set_result(next(rendered))
        except BaseException as error:  # noqa: BLE001 - each waiting request renders its tile itself
            for future in futures.values():
                if not future.done():
                    future.set_exception(error)
        finally:
            with self._pending_lock:
                for tile_key in futures:
                    self._pending.pop(tile_key, None)

    def warm_up(self) -> None:
        """Pay a first render's one-time costs (the run's lookups built, its arrays opened, thread pools
        started) before a page asks: render the tile of the first image's predicted class."""
        index = self.run.index
        if index.num_rows:
            self.tile(index.column("key")[0].as_py(), "overlay", f"c{index.column('pred')[0].as_py()}", SIZES[0])

    def map_values(self, key: str, map_name: str) -> np.ndarray:
        """The (gh, gw) map ``map_name`` of ``key`` (NaN where not stored)."""
        return self._map(key, map_name)

    def model_view_image(self, key: str, size: int) -> np.ndarray | None:
        """The image as the model saw it, at display size ``size`` (None if unreadable)."""
        return self._image(key, size)

    def _map(self, key: str, map_name: str) -> np.ndarray:
        """A map from the cache, or read now (and cached); the array itself, so no eviction can take it away."""
        values = self._maps.get((key, map_name), MISSING)
        if values is MISSING:
            values = self._read_maps([key], map_name)[0]
            self._maps.put((key, map_name), values, values.nbytes)
        return values

    def _image(self, key: str, size: int) -> np.ndarray | None:
        """An image at display size from the cache, or read now (and cached); None if unreadable."""
        picture = self._images.get((key, size), MISSING)
        if picture is MISSING:
            picture = self._read_image(key, size)
            self._images.put((key, size), picture, 64 if picture is None else picture.nbytes)
        return picture

    def close(self) -> None:
        self._ahead.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _read_maps(self, keys: list[str], map_name: str) -> np.ndarray:
        match = MAP_NAME.match(map_name)
        if match is None:
            raise RunError(f"map {map_name!r}: expected c<class>, s<slot> or att")
        if match.group(1) is not None:
            return self.run.maps_for(keys, [int(match.group(1))])[:, 0]
        rows = self.run.rows_of(keys)
        if match.group(2) is not None:
            return self.run.read_rows("cdam", rows)[:, int(match.group(2))].astype(np.float32)
        attention = self.run.read_rows("attention", rows).astype(np.float32).mean(axis=1)
        return attention - np.where(np.isfinite(attention), attention, np.inf).min(axis=(1, 2), keepdims=True)

    def _read_image(self, key: str, size: int) -> np.ndarray | None:
        try:
            image = self.run.image(key)
            try:
                picture = self.model_view(image, display_size(self.input_size, size))
            except (ValueError, OSError) as error:  # the eval transform refuses it (as it would have in the job)
                raise RunError(
                    f"image of {key!r} ({image.width}x{image.height}): cannot draw the model's view of it: {error}"
                ) from None
        except RunError as error:
            if key not in self.unreadable:
                self.unreadable[key] = str(error)
                print(f"note: {error}", file=sys.stderr)
            return None
        return np.asarray(picture.convert("RGB"), dtype=np.uint8)


def check_view(view: str) -> None:
    if view not in VIEWS:
        raise RunError(f"view {view!r}: expected one of {', '.join(VIEWS)}")
