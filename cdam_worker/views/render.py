"""Pictures of a run's maps: the model's view of an image, tiles (input, heatmap, overlay), placeholders,
and the captioned figure of ``cdam show``. numpy and Pillow (and timm's eval transform, for the model's view).

A map covers the image as the model saw it (resized and centre-cropped by the run's eval transform), so
every picture starts from :class:`ModelView`, and the map is upsampled onto it for display only.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cdam_worker.views.colormap import colorbar, colorize, overlay, symmetric_scale, upsample

VIEWS = ("input", "heatmap", "overlay")
"""How a tile shows an image and its map: the image alone, the map alone, or the map over the image."""
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
PLACEHOLDER_FILL = (225, 225, 225)
DEFAULT_CROP_PCT = 0.875
"""timm's crop_pct when a data config has none."""


class ModelView:
    """The picture steps of the run's eval transform (resize, crop; no tensor conversion or normalisation):
    ``view(image, size)`` is the image as the model saw it, at ``size`` (width, height; default the model's
    input size).

    timm's eval transforms are resizes and centre crops; where they crop inside the image, the model's
    input is a box of the original image, and the view is that box resampled once to ``size`` (a gallery
    tile: one resize of the original, not an upsampling to the input size, a crop and a downsampling).
    Steps that pad, or that this class does not know, run as they are and their result is resized.

    The box of timm's two plain eval transforms (``crop_mode`` "center" with a square resize, and "squash")
    is worked out from the data config alone, so the views import neither torch nor timm for them; other
    transforms are built with timm when first needed.
    """

    REDUCING_GAP = 3.0
    """Large reductions (photographs to thumbnails) first shrink by an integer factor, then resample."""

    def __init__(self, data_config: dict[str, Any]) -> None:
        self.config = {key: tuple(value) if isinstance(value, list) else value for key, value in data_config.items()}
        _, height, width = self.config["input_size"]
        self.input_size = (int(width), int(height))
        self.plain_steps = _plain_eval_steps(self.config)

    @functools.cached_property
    def steps(self) -> list[Callable[[Image.Image], Image.Image]]:
        """The eval transform's picture steps (timm's own), up to the conversion to a tensor."""
        from timm.data import create_transform

        steps = []
        for step in create_transform(**self.config, is_training=False).transforms:
            if "ToTensor" in type(step).__name__:
                break
            steps.append(step)
        return steps

    def __call__(self, image: Image.Image, size: tuple[int, int] | None = None) -> Image.Image:
        size = size or self.input_size
        box = self.box(image.size)
        if box is None:
            for step in self.steps:
                image = step(image)
            return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
        return image.resize(size, Image.Resampling.BICUBIC, box=box, reducing_gap=self.REDUCING_GAP)

    def box(self, image_size: tuple[int, int]) -> tuple[float, float, float, float] | None:
        """The model's input as a box (left, top, right, bottom) of the pixels of an image of ``image_size``
        (width, height); None if a step pads or is not a resize or a centre crop."""
        original_width, original_height = width, height = image_size
        left, top, right, bottom = 0.0, 0.0, float(width), float(height)
        for kind, size in self.plain_steps if self.plain_steps is not None else self._timm_geometry():
            if kind == "resize":
                width, height = _resized(size, width, height)
            elif kind == "keep_ratio":
                height, width = size.get_params(Image.new("1", (width, height)), size.size, size.longest)
            elif kind == "crop":
                crop_height, crop_width = size
                if crop_height > height or crop_width > width:
                    return None  # padded: not a box of the image
                crop_top, crop_left = int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0))
                x_scale, y_scale = (right - left) / width, (bottom - top) / height
                left, top = left + crop_left * x_scale, top + crop_top * y_scale
                right, bottom = left + crop_width * x_scale, top + crop_height * y_scale
                width, height = crop_width, crop_height
            else:
                return None
        return (
            max(0.0, left),
            max(0.0, top),
            min(float(original_width), right),
            min(float(original_height), bottom),
        )  # no rounding past the edges

    def _timm_geometry(self) -> list[tuple[str, Any]]:
        """The geometry of timm's built steps: ("resize", size), ("keep_ratio", step), ("crop", (h, w)), or
        ("other", step) for a step that is none of these."""
        from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio
        from torchvision.transforms import CenterCrop, Resize

        geometry: list[tuple[str, Any]] = []
        for step in self.steps:
            if isinstance(step, Resize) and step.max_size is None:
                geometry.append(("resize", step.size))
            elif isinstance(step, ResizeKeepRatio) and step.random_scale_prob == 0 and step.random_aspect_prob == 0:
                geometry.append(("keep_ratio", step))
            elif isinstance(step, (CenterCrop, CenterCropOrPad)):
                geometry.append(("crop", tuple(step.size)))
            else:
                geometry.append(("other", step))
        return geometry


def _plain_eval_steps(config: dict[str, Any]) -> list[tuple[str, Any]] | None:
    """The geometry of timm's ``transforms_imagenet_eval`` for ``config`` where it is a plain resize and centre
    crop ("center" with one scale for both sides, or "squash"), as ("resize", size) and ("crop", (h, w));
    None for any other transform (timm builds those)."""
    if config.get("crop_border_pixels") or config.get("crop_mode") not in (None, "center", "squash"):
        return None
    crop_pct = config.get("crop_pct") or DEFAULT_CROP_PCT
    crop = tuple(int(side) for side in config["input_size"][-2:])
    scale = tuple(math.floor(side / crop_pct) for side in crop)
    if config.get("crop_mode") == "squash":
        return [("resize", scale), ("crop", crop)]
    if scale[0] != scale[1]:
        return None  # timm's ResizeKeepRatio
    return [("resize", scale[0]), ("crop", crop)]


def _resized(size: int | Sequence[int], width: int, height: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: an int (or one-element list) sets the shorter
    side, keeping the aspect ratio; a pair is (height, width)."""
    if isinstance(size, int) or len(size) == 1:
        short = size if isinstance(size, int) else size[0]
        if width <= height:
            return short, int(short * height / width)
        return int(short * width / height), short
    return int(size[1]), int(size[0])


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
    canvas = Image.new(
        "RGB", (width + 3 * margin + bar_width + label_width, height + title_height + margin), BACKGROUND
    )
    canvas.paste(Image.fromarray(overlay(image, upsample(values, width, height), scale)), (margin, title_height))
    bar_left = width + 2 * margin
    canvas.paste(Image.fromarray(colorbar(height, bar_width)), (bar_left, title_height))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, margin), title, fill=INK, font=title_font)
    draw.text((margin, 2 * margin + title_font.size), subtitle, fill=INK, font=label_font)
    draw.rectangle((bar_left, title_height, bar_left + bar_width - 1, title_height + height - 1), outline=INK)
    for text, y in (
        (f"+{scale:.3g}", title_height),
        ("0", title_height + height / 2 - label_font.size / 2),
        (f"-{scale:.3g}", title_height + height - label_font.size),
    ):
        draw.text((bar_left + bar_width + margin // 2, y), text, fill=INK, font=label_font)
    return canvas


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)
