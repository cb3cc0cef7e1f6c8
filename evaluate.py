"""Evaluate trained teacher or student checkpoints on their own, without the rest of the pipeline.

For each checkpoint: accuracy on the test split (or --split holdout) with its 95% bootstrap
interval, per-class accuracy, negative log-likelihood and expected calibration error (ECE,
15 equal-width confidence bins). The split is the one the checkpoint was trained with; the
logits are computed once and kept beside the checkpoint (<stem>.logits.pt).

    python evaluate.py checkpoints/teacher.pt checkpoints/student_densenet121.pt
"""

from pathlib import Path

from utils.cli import UserError, add_data_args, add_device_args, make_parser, parse, run
from utils.runs import check_output_folder

HINT = "python teacherTrain.py (or StudentTrain.py)"


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="teacher or student checkpoints (teacherTrain.py, StudentTrain.py)")
    parser.add_argument("--split", default="test", choices=["test", "holdout"], help="which split to evaluate on")
    parser.add_argument("--out", default=None, help="also write every figure to this JSON file")
    add_data_args(parser)
    add_device_args(parser, compile=False, seed=False)
    return parser


def main(argv=None):
    args = parse(build_parser(), argv)
    if args.out:
        if Path(args.out).is_dir():
            raise UserError(f"--out {args.out} is a folder; give a file, such as {Path(args.out) / 'evaluation.json'}")
        check_output_folder(Path(args.out).parent, "--out")
    from utils.analyses import network_scores  # after the flags: --help and a refused flag need no torch
    from utils.checkpoint import load_checkpoint
    from utils.data import CLASSES, load_cifar10
    from utils.networks import Network
    from utils.report import write_json
    from utils.runtime import setup_runtime

    runtime = setup_runtime(args)
    data = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data)
    results = {}
    for path in args.checkpoints:
        if load_checkpoint(path, hint=HINT)["kind"] == "selector":
            raise UserError(f"{path} is a selector: evaluate it within the routed system with inference.py")
        network = Network(path, None, HINT, runtime)
        logits, labels = network.load_logits(data)[args.split]
        if len(labels) == 0:
            raise UserError(f"{path} was trained with --holdout 0: it has no hold-out split; use --split test")
        results[path] = {"kind": network.checkpoint["kind"], "arch": network.checkpoint["arch"],
                         "complete": bool(network.checkpoint.get("complete")), **network_scores(logits, labels)}
    print_tables(results, args.split, CLASSES)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, results)
        print(f"\nwrote {args.out}")


def print_tables(results, split, classes):
    print(f"\n{split} split; accuracy with its 95% bootstrap interval; NLL; ECE (15 bins)\n")
    print("| Checkpoint | Network | Accuracy | 95% interval | NLL | ECE |\n|---|---|---|---|---|---|")
    for path, r in results.items():
        name = f"{r['kind']} {r['arch']}" + ("" if r["complete"] else " [unfinished]")
        print(f"| `{path}` | {name} | {100 * r['accuracy']:.2f}% | {100 * r['accuracy_low']:.2f}–"
              f"{100 * r['accuracy_high']:.2f}% | {r['nll']:.3f} | {r['ece']:.4f} |")
    print("\nPer-class accuracy (%)\n\n| Checkpoint | " + " | ".join(classes) + " |\n|---|" + "---|" * len(classes))
    for path, r in results.items():
        print(f"| `{path}` | " + " | ".join(f"{100 * a:.1f}" for a in r["per_class"]) + " |")


if __name__ == "__main__":
    run(main)
