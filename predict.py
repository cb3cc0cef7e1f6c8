"""Classify your own image files with the routed students.

Each image (up to 50 megapixels, any mode; resized to 32x32) goes through the routed system of an experiment:
the --router policy with its threshold fitted on the hold-out split for --budget, which runs only
the students it needs. The router is fitted from the networks' cached logits (computed, and the
data decoded, only if the cache is missing). Every file is read before any network is loaded.
Prints, per file, the class, the students that ran and the confidence.

    python predict.py cat.jpg plane.png
    python predict.py --name cpu --router selector --budget 1.5 photos/*.jpg
"""

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from utils.cli import UserError, add_data_args, add_device_args, make_parser, parse, run
from utils.data import CLASSES, load_cifar10, normalize
from utils.routing import add_routing_args, fit_headline, load_selector, load_students, run_routed
from utils.runs import default_checkpoint, default_students
from utils.runtime import setup_runtime


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify (PNG, JPEG, ...)")
    add_routing_args(parser)
    add_data_args(parser)
    add_device_args(parser, compile=False, seed=False)
    return parser


def parse_args(argv=None):
    args = parse(build_parser(), argv)
    args.students = args.students or default_students(args.name)
    args.selector = args.selector or default_checkpoint(args.name, "selector")
    return args


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


def main(argv=None):
    args = parse_args(argv)
    images = [read_image(path) for path in args.images]  # a bad file is found before the networks load
    runtime = setup_runtime(args, varying_shapes=True)
    students = load_students(args.students, runtime, args.name)
    selector = load_selector(args.selector, students, runtime, name=args.name)
    data = functools.cache(lambda: load_cifar10(args.data_dir, args.download, verbose=False,
                                                allow_partial=args.partial_data))
    for net in [*students, selector]:
        net.load_logits(data)
    router = fit_headline(args.router, args.budget, students, selector)
    for path, image in zip(args.images, images):
        x = image[None].to(runtime.device)
        with runtime.autocast:
            routing = run_routed(router, students, selector, normalize(x, runtime.cuda), len(CLASSES))
        confidence, label = routing.probs.float().max(1)
        ran = ", ".join(f"student {k + 1} ({students[k].arch})" for k in routing.ran[0].nonzero().flatten().tolist())
        print(f"{path}: {CLASSES[label.item()]}  (ran {ran}; confidence {confidence.item():.3f})")


if __name__ == "__main__":
    run(main)
