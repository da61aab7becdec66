"""The one image decoder path: every file the project reads as an image goes through here.

Decoding follows what ImageNet-C's creation script and torchvision's ImageFolder do (PIL, no EXIF
rotation), so pixels match theirs; any PIL mode is converted to RGB uint8.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from robustbench_dyn.errors import BadImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(path) -> bool:
    """True if the file name has one of the image extensions the readers look for (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Return a PIL image of any mode as a C-contiguous uint8 array of shape (H, W, 3).

    16- and 32-bit integer modes are scaled to 8 bits (PIL's own conversion would saturate them);
    palette, CMYK, grey and alpha modes go through PIL's conversion (alpha is dropped, not blended).
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image).astype(np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values * 255.0 if values.max(initial=0) <= 1.0 else values), 0, 255)
        return np.ascontiguousarray(np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def load_rgb(path) -> np.ndarray:
    """Decode an image file into a uint8 array (H, W, 3).

    Raises :class:`BadImageError` naming the file for an empty, truncated or non-image file,
    and for a missing one.
    """
    path = Path(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise BadImageError(path, f"cannot read the file ({exc.strerror or exc})") from None
    if size == 0:
        raise BadImageError(path, "the file is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb_array(image)
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image PIL can decode") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(path, f"broken image ({exc})") from None


_INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize_center_crop(image: np.ndarray, resize: int = 256, crop: int = 224, interpolation: str = "bilinear") -> np.ndarray:
    """Resize the shorter side to ``resize`` (PIL, ``interpolation``) and take the centred ``crop`` square.

    Matches torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` on PIL images; with the default
    bilinear interpolation it is the preprocessing ImageNet-C was made with (hendrycks/robustness
    ``make_imagenet_c.py``). Returns uint8 (crop, crop, 3).
    """
    height, width = image.shape[:2]
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_h, new_w = resize, int(resize * width / height)
    pil = Image.fromarray(image)
    if (new_w, new_h) != (width, height):
        pil = pil.resize((new_w, new_h), _INTERPOLATIONS[interpolation])
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    if top < 0 or left < 0:
        raise ValueError(f"cannot crop {crop}x{crop} from an image resized to {new_w}x{new_h}")
    return np.ascontiguousarray(np.asarray(pil)[top : top + crop, left : left + crop])


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of uint8 (H, W, 3) ``pixels`` (PIL, ``optimize=True`` as make_imagenet_c.py saves)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """uint8 (H, W, 3) pixels of JPEG bytes, decoded as :func:`load_rgb` decodes a file."""
    with Image.open(io.BytesIO(data)) as image:
        return to_rgb_array(image)
