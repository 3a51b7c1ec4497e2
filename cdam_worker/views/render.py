"""Pictures of a run's maps: the model's view of an image, tiles (input, heatmap, overlay), placeholders,
and the captioned figure of ``cdam show``. numpy and Pillow (and timm's eval transform, for the model's view).

A map covers the image as the model saw it (resized and centre-cropped by the run's eval transform), so
every picture starts from :class:`ModelView`, and the map is upsampled onto it for display only.
"""

from __future__ import annotations

import io
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


class ModelView:
    """The picture steps of the run's eval transform (resize, crop; no tensor conversion or normalisation):
    ``view(image, size)`` is the image as the model saw it, at ``size`` (width, height; default the model's
    input size).

    timm's eval transforms are resizes and centre crops; where they crop inside the image, the model's
    input is a box of the original image, and the view is that box resampled once to ``size`` (a gallery
    tile: one resize of the original, not an upsampling to the input size, a crop and a downsampling).
    Steps that pad, or that this class does not know, run as they are and their result is resized.
    """

    REDUCING_GAP = 3.0
    """Large reductions (photographs to thumbnails) first shrink by an integer factor, then resample."""

    def __init__(self, data_config: dict[str, Any]) -> None:
        from timm.data import create_transform

        config = {key: tuple(value) if isinstance(value, list) else value for key, value in data_config.items()}
        self.steps: list[Callable[[Image.Image], Image.Image]] = []
        for step in create_transform(**config, is_training=False).transforms:
            if "ToTensor" in type(step).__name__:
                break
            self.steps.append(step)
        _, height, width = config["input_size"]
        self.input_size = (int(width), int(height))

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
        from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio
        from torchvision.transforms import CenterCrop, Resize

        original_width, original_height = width, height = image_size
        left, top, right, bottom = 0.0, 0.0, float(width), float(height)
        for step in self.steps:
            if isinstance(step, Resize) and step.max_size is None:
                width, height = _resized(step.size, width, height)
            elif isinstance(step, ResizeKeepRatio) and step.random_scale_prob == 0 and step.random_aspect_prob == 0:
                height, width = step.get_params(Image.new("1", (width, height)), step.size, step.longest)
            elif isinstance(step, (CenterCrop, CenterCropOrPad)):
                crop_height, crop_width = step.size
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
