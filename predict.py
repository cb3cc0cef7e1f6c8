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
from pathlib import Path

from utils.cli import add_data_args, add_device_args, add_routing_args, make_parser, parse, run
from utils.runs import default_checkpoint, default_students


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


def main(argv=None):
    args = parse_args(argv)
    from utils.data import CLASSES, load_cifar10, normalize  # after the flags: --help and a refused flag need no torch
    from utils.experiment import load_selector, load_students
    from utils.images import read_image
    from utils.policies import NoThresholdError
    from utils.routed import Ladder, budget_refusal, fit_policy, run_routed
    from utils.runtime import setup_runtime

    images = [read_image(path) for path in args.images]  # a bad file is found before the networks load
    runtime = setup_runtime(args, varying_shapes=True)
    students = load_students(args.students, runtime, args.name)
    selector = load_selector(args.selector, students, runtime, name=args.name)
    data = functools.cache(lambda: load_cifar10(args.data_dir, args.download, verbose=False,
                                                allow_partial=args.partial_data))
    for net in [*students, selector]:
        net.load_logits(data)
    try:
        router = fit_policy(args.router, Ladder(students, selector), budget=args.budget)
    except NoThresholdError as error:
        raise budget_refusal(args.router, args.budget, error) from None
    for path, image in zip(args.images, images):
        x = image[None].to(runtime.device)
        with runtime.autocast:
            routing = run_routed(router, students, selector, normalize(x, runtime.cuda), len(CLASSES))
        confidence, label = routing.probs.float().max(1)
        ran = ", ".join(f"student {k + 1} ({students[k].arch})" for k in routing.ran[0].nonzero().flatten().tolist())
        print(f"{path}: {CLASSES[label.item()]}  (ran {ran}; confidence {confidence.item():.3f})")


if __name__ == "__main__":
    run(main)
