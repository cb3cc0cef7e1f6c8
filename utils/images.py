"""Users' own image files as the networks take them: 8-bit RGB, upright, 32x32."""

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from utils.cli import UserError

MAX_PIXELS = 50_000_000  # a larger image is refused before it is decoded: a small file can claim any size
BACKGROUND = (255, 255, 255)  # what transparent pixels show, as on a white page
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image):
    """An 8-bit RGB copy of a PIL image of any mode, with the same relative brightness.

    Integer grey of 16 or 32 bits (``I;16``, ``I``) is scaled from 0..65535 to 0..255 and float grey
    (``F``) from 0..1; transparent pixels (an alpha channel, or ``P`` and ``L`` with a transparent
    colour) are composited over white; other modes (``CMYK``, ``YCbCr``, ``1``, ``L``, ``P``) take
    Pillow's own conversion.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        scale = 255 if image.mode == "F" else 255 / 65535
        grey = np.clip(np.asarray(image, dtype=np.float64) * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def read_image(path):
    """uint8 ``(3, 32, 32)``: the file's image as RGB (``to_rgb``), upright as its EXIF says, resized to 32x32.

    Only the header is read before the size is checked against ``MAX_PIXELS``, and Pillow's own
    guard against decompression bombs is an error here, not a warning.
    """
    if Path(path).exists() and not Path(path).is_file():  # a FIFO or a device would be read forever
        raise UserError(f"{path} is not a regular file (a folder, a pipe or a device); give image files")
    too_large = UserError(f"{path} is larger than {MAX_PIXELS // 10**6} megapixels, the limit of predict.py; "
                          "shrink it first")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise too_large
                image = to_rgb(ImageOps.exif_transpose(image)).resize((32, 32), Image.Resampling.BICUBIC)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large from None
    except FileNotFoundError:
        raise UserError(f"no image file at {path}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # what Pillow raises for a file it cannot decode
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
