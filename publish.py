"""Publish an experiment's trained students and selector (and, with --with-teacher, its teacher) as weights
beside its results bundle: results/[NAME/]weights/ (docs/weights.md has the format).

Weights only, floating tensors in bfloat16, gzipped, each file at most 15 MiB, and manifest.json: every file's
sha256, each network's architecture, split, data fingerprint, test-time views and provenance, and its hold-out and
test accuracy measured here in the published precision (the rounded weights, in float32 on a CPU or under bf16
autocast on CUDA). The teacher (ResNet50, about 45 MiB in 16 bits) is over that size: it is written only on request,
to use on your own machines. The folder is written beside itself, then renamed; an existing folder of published
weights is replaced only with --force, and a folder that holds anything else never.

With --from FOLDER --pair it writes instead a copy of a published folder that keeps one pair and its selector (the
teacher too, where published), as the students and the selector every script routes: what a repository that keeps
the weights of one pair commits. --pair best keeps the pair whose best routed system is the most accurate on the
hold-out split of the bundle FOLDER sits in (its results.json), the generalists on a tie.

    python publish.py --name cpu
    python publish.py --students a.pt b.pt --selector s.pt --out results/mine/weights
    python publish.py --from results/published/h200-2026-12-10/weights --pair best --force   # in place
"""

import json
from pathlib import Path

from utils.cli import (
    POSITIVE_INT,
    UserError,
    add_data_args,
    add_device_args,
    experiment_name,
    make_parser,
    parse,
    run,
)
from utils.choices import SPECIALISATIONS
from utils.published import PAIRS, refuse_existing
from utils.runs import (
    RESULTS_ROOT,
    check_output_folder,
    continue_command,
    default_checkpoint,
    default_students,
    final_command,
    final_path,
)


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--name", default="", type=experiment_name,
                        help="experiment name: read checkpoints/NAME/, write results/NAME/weights/ (default: "
                             "checkpoints/, results/weights/)")
    parser.add_argument("--students", nargs="+", default=None,
                        help="student checkpoints, in the order the selector was trained for (default: "
                             "checkpoints/[NAME/]student_densenet121.pt and student_googlenet.pt)")
    parser.add_argument("--selector", default=None,
                        help="selector checkpoint (default: checkpoints/[NAME/]selector.pt)")
    parser.add_argument("--specialists", choices=("auto", "none", *SPECIALISATIONS), default="auto",
                        help="publish a method's specialists and their selector too (spec1..., spec_selector), as "
                             "inference.py --specialists finds them; auto: the method whose are there, if any")
    parser.add_argument("--teacher", default=None, help="teacher checkpoint, for --with-teacher (default: "
                                                        "checkpoints/[NAME/]teacher.pt)")
    parser.add_argument("--with-teacher", action="store_true",
                        help="publish the teacher too (over the size of a published file: for your own machines)")
    parser.add_argument("--out", default=None,
                        help="the published folder (default: results/[NAME/]weights, beside inference.py's bundle)")
    parser.add_argument("--force", action="store_true",
                        help="replace the published folder --out if it exists (a folder of published weights only)")
    parser.add_argument("--from", dest="source", default=None, metavar="FOLDER",
                        help="a published folder to copy with one pair only (--pair), instead of publishing "
                             "checkpoints (--out defaults to FOLDER itself, which needs --force)")
    parser.add_argument("--pair", choices=("best", *PAIRS), default=None,
                        help="with --from: the pair to keep; best: the one whose best routed system is the most "
                             "accurate on the hold-out split of the bundle FOLDER sits in")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=1024, help="images per forward pass")
    add_data_args(parser)
    add_device_args(parser, compile=False, seed=False)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parse(parser, argv)
    if (args.source is None) != (args.pair is None):
        parser.error("--from and --pair go together: the published folder, and the pair of it to keep")
    if args.source:
        args.out = args.out or args.source
        return args
    args.students = args.students or default_students(args.name)
    args.selector = args.selector or default_checkpoint(args.name, "selector")
    args.teacher = args.teacher or default_checkpoint(args.name, "teacher")
    args.out = args.out or str(RESULTS_ROOT / args.name / "weights")
    return args


def main(argv=None):
    args = parse_args(argv)
    refuse_existing(args.out, args.force)
    if args.source:
        return keep_one_pair(args)
    check_output_folder(Path(args.out).parent, "--out")
    from utils.data import load_cifar10  # after the flags: --help and a refused flag need no torch
    from utils.experiment import (
        check_split,
        load_selector,
        load_students,
        named,
        specialist_method,
        specialist_paths,
        students_split,
    )
    from utils.export import export_weights
    from utils.networks import Network
    from utils.runtime import setup_runtime, stoppable

    split = students_split(args.students, args.name)
    runtime = setup_runtime(args)
    networks = {}
    if args.with_teacher:
        networks["teacher"] = Network(args.teacher, "teacher", named("python teacherTrain.py", args.name), runtime)
        check_split(networks["teacher"], split)
    students = load_students(args.students, runtime, args.name)
    networks.update({f"student{k}": s for k, s in enumerate(students, 1)})
    networks["selector"] = load_selector(args.selector, students, runtime, name=args.name)
    method = specialist_method(args)
    if method:
        paths = specialist_paths(args, method)
        specialists = load_students(paths["students"], runtime, args.name)
        networks.update({f"spec{k}": s for k, s in enumerate(specialists, 1)})
        networks["spec_selector"] = load_selector(paths["selector"], specialists, runtime, name=args.name)
    data = load_cifar10(args.data_dir, args.download, verbose=False, allow_partial=args.partial_data)
    with stoppable("measuring the published weights (nothing was written)", continue_command(args.command, False)):
        manifest = export_weights(networks, data, args.out, final_command(args.command), args.force,
                                  args.batch_size)
    print_manifest(manifest, final_path(args.out))


def keep_one_pair(args):
    from utils.published import read_manifest
    from utils.weights import keep_pair  # after the flags: --help and a refused flag need no torch

    pair = args.pair
    if pair == "best":
        read_manifest(args.source)  # a published folder, before its bundle is read
        best = best_routing_per_pair(Path(args.source).resolve().parent / "results.json")
        pair = max(best, key=lambda p: (best[p][0], p == "generalists"))
        print("best routed system of each pair on the hold-out split: " + "; ".join(
            f"{p} {100 * acc:.2f}% ({policy} at {budget}x)" for p, (acc, policy, budget) in best.items())
            + f"; keeping the {pair}")
    manifest = keep_pair(args.source, pair, args.out, args.force)
    print(f"{args.out}/ keeps the {pair}: " + ", ".join(f"{k} {e['file']}" for k, e in manifest["networks"].items()))


def best_routing_per_pair(results_path):
    """``{pair: (hold-out accuracy, policy, budget)}``: each pair's most accurate routed system on the hold-out split,
    at any budget the bundle sets the pairs side by side (``results["pairs"]``)."""
    try:
        budgets = json.loads(Path(results_path).read_text())["pairs"]["budgets"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--pair best reads the pairs' hold-out accuracies in {results_path}, the bundle's, and "
                        f"cannot ({type(e).__name__}: {e}); name the pair instead") from None
    best = {}
    for budget, rows in budgets.items():
        for key, row in rows.items():
            pair = "generalists" if key == "generalists" else "specialists"
            if pair not in best or row["holdout_accuracy"] > best[pair][0]:
                best[pair] = (row["holdout_accuracy"], row["policy"], budget)
    if len(best) < 2:
        raise UserError(f"{results_path} sets no specialists beside the generalists: there is one pair, nothing to "
                        "choose")
    return best


def print_manifest(manifest, out):
    measured = manifest["measured"]
    print(f"published in {out}/ (accuracy measured with {manifest['precision']} weights, {measured['arithmetic']} "
          f"arithmetic, on {measured['device']}; {measured['images']['holdout']} hold-out and "
          f"{measured['images']['test']} test images):")
    for k, entry in manifest["networks"].items():
        acc = entry["accuracy"]
        print(f"  {entry['file']:<32} {entry['bytes'] / 2**20:6.2f} MiB  hold-out {100 * acc['holdout']:.2f}%  "
              f"test {100 * acc['test']:.2f}%" + (f"  ({entry['accuracy_of']})" if "accuracy_of" in entry else ""))


if __name__ == "__main__":
    run(main)
