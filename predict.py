"""Classify your own image files with the routed students.

Each image (up to 50 megapixels, any mode; resized to 32x32) goes through the routed system of an experiment:
the --router policy with its threshold fitted on the hold-out split for --budget, which runs only
the students it needs. The networks are published weights (--weights; by default, with none of
--weights, --name, --students and --selector, the newest in results/published/*/weights/, said in
the first line) or checkpoints (by default those of checkpoints/[NAME/]). The router is fitted on
the hold-out logits that published weights carry (no data needed), or on the checkpoints' cached
logits (computed, and the data decoded, only if the cache is missing). Every file is read before any
network is loaded. Prints, per file, the routed class and its confidence, and each student that ran
with its own answer and confidence (temperature-calibrated on the hold-out split).

    python predict.py cat.jpg plane.png
    python predict.py --name cpu --router selector --budget 1.5 photos/*.jpg
"""

import functools
from pathlib import Path

from utils.cli import UserError, add_data_args, add_device_args, add_routing_args, make_parser, parse, run
from utils.published import PUBLISHED_ROOT, newest_published, published_paths, read_manifest, student_paths
from utils.runs import default_checkpoint, default_students, experiments_holding


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify (PNG, JPEG, ...)")
    add_routing_args(parser)
    parser.add_argument("--weights", default=None, metavar="FOLDER",
                        help="published weights (publish.py) to route (default: the newest in "
                             f"{PUBLISHED_ROOT}/*/weights/ when none of --name, --students and --selector is given)")
    add_data_args(parser)
    add_device_args(parser, compile=False, seed=False)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parse(parser, argv)
    checkpoints = args.students or args.selector or args.name
    args.defaults = not (checkpoints or args.weights)  # nothing named: published weights, else checkpoints/
    if args.weights and checkpoints:
        parser.error("--weights gives the students and the selector: give --weights, or --name, --students and "
                     "--selector, not both")
    args.weights = args.weights or (None if checkpoints else newest_published())
    if args.weights:
        paths = published_paths(args.weights)
        args.students, args.selector = student_paths(paths), paths["selector"]
        return args
    args.students = args.students or default_students(args.name)
    args.selector = args.selector or default_checkpoint(args.name, "selector")
    return args


def main(argv=None):
    args = parse_args(argv)
    from utils.data import CLASSES, load_cifar10, normalize  # after the flags: --help and a refused flag need no torch
    from utils.experiment import load_selector, load_students
    from utils.images import read_image
    from utils.policies import NoThresholdError
    from utils.routed import Ladder, budget_refusal, fit_policy, routed_outputs
    from utils.runtime import setup_runtime

    images = [read_image(path) for path in args.images]  # a bad file is found before the networks load
    if not args.weights and args.defaults and not all(Path(p).exists() for p in [*args.students, args.selector]):
        others = experiments_holding(Path(args.selector).name)
        raise UserError(f"no published weights in {PUBLISHED_ROOT}/*/weights/ and no trained checkpoints in "
                        "checkpoints/; train them with `python reproduce.py` (publish.py publishes them), or give "
                        "--weights FOLDER" + (f" (experiments with a selector: {others})" if others else ""))
    if args.weights:
        print(f"using the published weights {args.weights} ({describe_published(args.weights)})")
    runtime = setup_runtime(args, varying_shapes=True)
    students = load_students(args.students, runtime, args.name)
    selector = load_selector(args.selector, students, runtime, name=args.name)
    data = functools.cache(lambda: load_cifar10(args.data_dir, args.download, verbose=False,
                                                allow_partial=args.partial_data))
    for net in [*students, selector]:
        net.load_logits(data, holdout_only=True)
    try:
        router = fit_policy(args.router, Ladder(students, selector), budget=args.budget)
    except NoThresholdError as error:
        raise budget_refusal(args.router, args.budget, error) from None
    for path, image in zip(args.images, images):
        x = image[None].to(runtime.device)
        with runtime.autocast:
            outputs, ran = routed_outputs(router, students, selector, normalize(x, runtime.cuda), len(CLASSES))
        confidence, label = router.route(outputs).probs.float().max(1)
        answers = []
        for k in ran[0].nonzero().flatten().tolist():
            own, own_label = (outputs.logits[0, k].float() / students[k].temperature).softmax(0).max(0)
            answers.append(f"student {k + 1} ({students[k].arch}): {CLASSES[own_label.item()]} {own.item():.3f}")
        print(f"{path}: {CLASSES[label.item()]}  confidence {confidence.item():.3f}  (ran {'; '.join(answers)})")


def describe_published(folder):
    """``students densenet121, googlenet and the selector, trained at commit ... on ...``: a published folder (``mcl
    specialists ...`` where it keeps a pair of specialists as its students)."""
    networks = read_manifest(folder)["networks"]
    archs = [e["arch"] for k, e in networks.items() if k.startswith("student")]
    method = (networks["student1"].get("specialist") or {}).get("method")
    trained = networks["selector"]["trained"].get("provenance", {})
    return (f"{f'{method} specialists' if method else 'students'} {', '.join(archs)} and the selector, trained at "
            f"commit {trained.get('git_commit', '?')} on {trained.get('device', '?')}")


if __name__ == "__main__":
    run(main)
