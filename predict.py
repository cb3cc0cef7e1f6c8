"""Classify your own image files with the routed students.

Each image (any size and mode; resized to 32x32) goes through the routed system of an experiment:
the --router policy with its threshold fitted on the hold-out split for --budget, which runs only
the students it needs. The router is fitted from the networks' cached logits (computed, and the
data decoded, only if the cache is missing). Prints, per file, the class, the students that ran and
the confidence.

    python predict.py cat.jpg plane.png
    python predict.py --name cpu --router selector --budget 1.5 photos/*.jpg
"""

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from utils.cli import UserError, add_data_args, add_device_args, make_parser, parse, run
from utils.data import CLASSES, load_cifar10, normalize
from utils.routing import add_routing_args, load_selector, load_students, run_routed, try_fit
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


def read_image(path):
    """uint8 ``(3, 32, 32)``: the file's image as RGB, resized to 32x32."""
    try:
        image = Image.open(path).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__})") from None
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def main(argv=None):
    args = parse_args(argv)
    runtime = setup_runtime(args)
    students = load_students(args.students, runtime, args.name)
    selector = load_selector(args.selector, students, runtime)
    data = functools.cache(lambda: load_cifar10(args.data_dir, args.download, verbose=False,
                                                allow_partial=args.partial_data))
    for net in [*students, selector]:
        net.load_logits(data)
    router = try_fit(args.router, args.budget, students, selector)
    if router is None:
        raise UserError(f"no {args.router} routing fits --budget {args.budget:g} on the hold-out split; raise it")
    for path in args.images:
        x = read_image(path)[None].to(runtime.device)
        with runtime.autocast:
            routing = run_routed(router, students, selector, normalize(x, runtime.cuda), len(CLASSES))
        confidence, label = routing.probs.float().max(1)
        ran = ", ".join(f"student {k + 1} ({students[k].arch})" for k in routing.ran[0].nonzero().flatten().tolist())
        print(f"{path}: {CLASSES[label.item()]}  (ran {ran}; confidence {confidence.item():.3f})")


if __name__ == "__main__":
    run(main)
