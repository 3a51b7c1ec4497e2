"""Pictures of a run's maps: the model's view of an image, tiles (input, heatmap, overlay), placeholders,
and the captioned figure of ``cdam show``. numpy and Pillow only.

A map covers the image as the model saw it (resized and centre-cropped by the run's eval transform), so
every picture starts from :func:`model_view`, and the map is upsampled onto it for display only.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cdam_worker.views.colormap import colorbar, colorize, overlay, symmetric_scale, upsample

VIEWS = ("input", "heatmap", "overlay")
"""How a tile shows an image and its map: the image alone, the map alone, or the map over the image."""
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
PLACEHOLDER_FILL = (225, 225, 225)


def model_view_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], Image.Image]:
    """The picture steps of the run's eval transform (resize, crop; no tensor conversion or normalisation)."""
    from timm.data import create_transform

    config = {key: tuple(value) if isinstance(value, list) else value for key, value in data_config.items()}
    steps = []
    for step in create_transform(**config, is_training=False).transforms:
        if "ToTensor" in type(step).__name__:
            break
        steps.append(step)

    def apply(image: Image.Image) -> Image.Image:
        for step in steps:
            image = step(image)
        return image

    return apply


def display_size(input_size: tuple[int, int], longest: int) -> tuple[int, int]:
    """(width, height) of a picture of the model's input (height, width) whose longer side is ``longest``."""
    height, width = input_size
    factor = longest / max(height, width)
    return max(1, round(width * factor)), max(1, round(height * factor))


def tile(view: str, image: np.ndarray | None, values: np.ndarray | None, size: tuple[int, int]) -> Image.Image:
    """One tile of ``size`` (width, height): ``image`` is the model's view at that size (H, W, 3) uint8,
    ``values`` the (gh, gw) map; what a view needs and lacks becomes a placeholder saying so."""
    width, height = size
    if view == "input":
        return Image.fromarray(image) if image is not None else placeholder(size, "image unreadable")
    if values is None or not np.isfinite(values).any():
        return placeholder(size, "no map")
    pixels = upsample(values, width, height)
    scale = symmetric_scale(values)
    if view == "heatmap":
        return Image.fromarray(colorize(pixels, scale))
    if image is None:
        return placeholder(size, "image unreadable")
    return Image.fromarray(overlay(image, pixels, scale))


def placeholder(size: tuple[int, int], text: str) -> Image.Image:
    """A grey tile with ``text`` in its middle."""
    picture = Image.new("RGB", size, PLACEHOLDER_FILL)
    draw = ImageDraw.Draw(picture)
    font = _font(max(9, size[1] // 10))
    box = draw.textbbox((0, 0), text, font=font)
    draw.text(((size[0] - (box[2] - box[0])) / 2, (size[1] - (box[3] - box[1])) / 2), text, fill=INK, font=font)
    return picture


def encode(picture: Image.Image, format: str = "PNG") -> bytes:
    """``picture`` as PNG (lossless) or JPEG (small and quick to encode: the dashboard's and the report's tiles)."""
    buffer = io.BytesIO()
    if format == "JPEG":
        picture.convert("RGB").save(buffer, format="JPEG", quality=88)
    else:
        picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def figure(image: np.ndarray, values: np.ndarray, title: str, subtitle: str) -> Image.Image:
    """``cdam show``: the map over the image, a colour bar labelled with the map's symmetric scale, a title
    (the class) and a subtitle (the key, what the colours mean)."""
    height, width = image.shape[:2]
    scale = symmetric_scale(values)
    margin, bar_width = max(8, width // 40), max(12, width // 24)
    title_font, label_font = _font(max(14, width // 22)), _font(max(11, width // 36))
    title_height = title_font.size + label_font.size + 3 * margin
    label_width = round(label_font.getlength(f"-{scale:.3g}")) + margin
    canvas = Image.new("RGB", (width + 3 * margin + bar_width + label_width, height + title_height + margin), BACKGROUND)
    canvas.paste(Image.fromarray(overlay(image, upsample(values, width, height), scale)), (margin, title_height))
    bar_left = width + 2 * margin
    canvas.paste(Image.fromarray(colorbar(height, bar_width)), (bar_left, title_height))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, margin), title, fill=INK, font=title_font)
    draw.text((margin, 2 * margin + title_font.size), subtitle, fill=INK, font=label_font)
    draw.rectangle((bar_left, title_height, bar_left + bar_width - 1, title_height + height - 1), outline=INK)
    for text, y in ((f"+{scale:.3g}", title_height), ("0", title_height + height / 2 - label_font.size / 2), (f"-{scale:.3g}", title_height + height - label_font.size)):
        draw.text((bar_left + bar_width + margin // 2, y), text, fill=INK, font=label_font)
    return canvas


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)
