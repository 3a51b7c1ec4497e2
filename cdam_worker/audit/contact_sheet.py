"""A contact sheet per flagged cluster: the most relevant spot of each of its images, cropped from the original.

An image flagged for a mark (or tipped over) gets a spot tile; one flagged for a background/context cue gets
its whole model input (the original under the eval transform's crop) with the whole map overlaid, since its
evidence lies on the surroundings rather than on one spot. A spot tile is the image's spot (``features.spot``: the ``w x w`` tokens holding most of its class-specific
evidence) widened by one token on every side, mapped back through the model's eval transform (resize and
centre crop, from the run's ``data_config``) onto the original image, cropped there, and shown with the
class map overlaid (red = evidence for the class, blue = against, opacity by magnitude) and the spot
outlined. Tiles are ordered by image score, most suspicious first, at most ``MAX_TILES``.
"""

from __future__ import annotations

import io
import math
import textwrap
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cdam_worker.audit.features import spot_width
from cdam_worker.reading import Run, RunError
from cdam_worker.storage import StorageError

TILE = 128
FONT_SIZE = 14
CAPTION = 18  # pixels per line of text
TITLE_LINES = 3
COLUMNS = 8
MAX_TILES = 64
OVERLAY_OPACITY = 0.55


def contact_sheet(
    run: Run, keys: list[str], maps: np.ndarray, spots: np.ndarray, title: str, whole: np.ndarray | None = None
) -> tuple[bytes, list[str]]:
    """PNG bytes of the sheet for ``keys`` (their class maps (n, gh, gw) and spot centres (n, 2) as grid
    fractions; ``whole`` (n,) bool: show the whole image instead of the spot), and one note per image that
    could not be shown (its tile stays grey)."""
    keys = keys[:MAX_TILES]
    rows = max(1, math.ceil(len(keys) / COLUMNS))
    header = TITLE_LINES * CAPTION
    sheet = Image.new("RGB", (COLUMNS * TILE, header + rows * (TILE + CAPTION)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=FONT_SIZE)
    for line, text in enumerate(textwrap.wrap(title, width=COLUMNS * TILE // 8)[:TITLE_LINES]):
        draw.text((4, line * CAPTION + 1), text, fill=(255, 255, 255), font=font)
    notes = []
    for n, key in enumerate(keys):
        left, top = (n % COLUMNS) * TILE, header + (n // COLUMNS) * (TILE + CAPTION)
        try:
            tile = _tile(run, key, maps[n], spots[n], bool(whole[n]) if whole is not None else False)
        except (RunError, StorageError, OSError) as error:  # a shard gone or unreadable: the tile stays grey
            notes.append(f"contact sheet: image {key!r}: {error}")
            continue
        sheet.paste(tile, (left, top))
        draw.text((left + 2, top + TILE + 1), key[-16:], fill=(200, 200, 200), font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue(), notes


def _tile(run: Run, key: str, class_map: np.ndarray, spot: np.ndarray, whole: bool) -> Image.Image:
    """The image's spot, widened by a token (or its whole input), cropped from the original with the map overlaid."""
    image = run.image(key)
    gh, gw = class_map.shape
    width = spot_width((gh, gw))
    if whole:
        top, left, bottom, right = 0, 0, gh, gw
    else:
        top = int(np.clip(round(spot[0] * gh - width / 2) - 1, 0, gh - 1))
        left = int(np.clip(round(spot[1] * gw - width / 2) - 1, 0, gw - 1))
        bottom, right = min(gh, top + width + 2), min(gw, left + width + 2)
    box = input_box_in_image((top, left, bottom, right), (gh, gw), image.size, run.attrs)
    crop = image.crop(box).resize((TILE, TILE), Image.Resampling.BILINEAR)
    region = class_map[top:bottom, left:right]
    overlay = _overlay(region, np.abs(class_map).max())
    overlay = overlay.resize((TILE, TILE), Image.Resampling.NEAREST)
    tile = Image.composite(overlay.convert("RGB"), crop, overlay.getchannel("A"))
    if whole:
        return tile
    draw = ImageDraw.Draw(tile)
    sy, sx = TILE / (bottom - top), TILE / (right - left)
    y0, x0 = spot[0] * gh - width / 2 - top, spot[1] * gw - width / 2 - left
    draw.rectangle([x0 * sx, y0 * sy, (x0 + width) * sx - 1, (y0 + width) * sy - 1], outline=(255, 255, 0))
    return tile


def _overlay(region: np.ndarray, scale: float) -> Image.Image:
    """RGBA: red where the map is positive, blue where negative, opacity by magnitude against ``scale``."""
    value = np.clip(region / max(float(scale), 1e-30), -1.0, 1.0)
    rgba = np.zeros((*region.shape, 4), dtype=np.uint8)
    rgba[..., 0] = np.where(value > 0, 255, 0)
    rgba[..., 2] = np.where(value < 0, 255, 0)
    rgba[..., 3] = (np.abs(value) * OVERLAY_OPACITY * 255).astype(np.uint8)
    return Image.fromarray(rgba, mode="RGBA")


def input_box_in_image(
    tokens: tuple[int, int, int, int], grid: tuple[int, int], size: tuple[int, int], attrs: dict[str, Any]
) -> tuple[int, int, int, int]:
    """Pixels (left, top, right, bottom) of the original image under a box of tokens (top, left, bottom,
    right), inverting timm's eval transform: resize (shorter side, or both sides for "squash"), centre crop."""
    config = attrs.get("data_config", {})
    _, in_h, in_w = config.get("input_size", attrs.get("input_size", [3, grid[0], grid[1]]))
    crop_pct = float(config.get("crop_pct") or 1.0)
    width, height = size
    scaled_h, scaled_w = math.floor(in_h / crop_pct), math.floor(in_w / crop_pct)
    if config.get("crop_mode") == "squash":
        fy, fx = scaled_h / height, scaled_w / width
    else:
        fy = fx = max(scaled_h / height, scaled_w / width)
    off_y, off_x = (height * fy - in_h) / 2, (width * fx - in_w) / 2
    top, left, bottom, right = tokens
    ty, tx = in_h / grid[0], in_w / grid[1]
    box = ((left * tx + off_x) / fx, (top * ty + off_y) / fy, (right * tx + off_x) / fx, (bottom * ty + off_y) / fy)
    return (max(0, int(box[0])), max(0, int(box[1])), min(width, math.ceil(box[2])), min(height, math.ceil(box[3])))
