"""Evaluate trained teacher or student checkpoints, or published weights, on their own, without the rest of
the pipeline.

For each: accuracy on the test split (or --split holdout) with its 95% bootstrap interval, its
hold-out accuracy beside it, per-class accuracy, negative log-likelihood and expected calibration
error (ECE, 15 equal-width confidence bins), its test-time views and GFLOPs per image (views
included); with --timed-passes, its measured images/s on this machine. The split is the one the
network was trained with; the logits are computed once and cached (<stem>.logits.pt beside a
checkpoint; the per-user cache for published weights). --tta evaluates every network with the
test-time views given instead of its own (flip: 2 forward passes per image, twice the GFLOPs):
what flip TTA buys, measured on a CPU from published weights.

    python evaluate.py checkpoints/teacher.pt checkpoints/student_densenet121.pt
    python evaluate.py results/published/*/weights/student*.pt.gz --tta flip --timed-passes 1
"""

from pathlib import Path

from utils.choices import TTA
from utils.cli import NON_NEGATIVE_INT, UserError, add_data_args, add_device_args, make_parser, parse, run
from utils.runs import check_output_file

HINT = "python teacherTrain.py (or StudentTrain.py)"


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="teacher or student checkpoints (teacherTrain.py, StudentTrain.py), or their "
                             "published weights (publish.py)")
    parser.add_argument("--split", default="test", choices=["test", "holdout"], help="which split to evaluate on")
    parser.add_argument("--tta", default=None, choices=TTA,
                        help="test-time views of every network instead of its own (default: its own)")
    parser.add_argument("--timed-passes", type=NON_NEGATIVE_INT, default=0,
                        help="timed passes over the split for each network's images/s, after an untimed one (the "
                             "median is reported); 0 measures no speed")
    parser.add_argument("--out", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--force", action="store_true", help="replace the file --out names where it exists")
    add_data_args(parser)
    add_device_args(parser, compile=False, seed=False)
    return parser


def main(argv=None):
    args = parse(build_parser(), argv)
    if args.out:
        check_output_file(args.out, args.force)
    from utils.analyses import network_scores  # after the flags: --help and a refused flag need no torch
    from utils.checkpoint import load_checkpoint
    from utils.data import CLASSES, load_cifar10
    from utils.networks import Network
    from utils.report import write_json
    from utils.runtime import device_name, setup_runtime

    runtime = setup_runtime(args)
    data = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data)
    results = {}
    for path in args.checkpoints:
        if load_checkpoint(path, hint=HINT)["kind"] == "selector":
            raise UserError(f"{path} is a selector: evaluate it within the routed system with inference.py")
        network = Network(path, None, HINT, runtime, tta=args.tta)
        logits = network.load_logits(data)
        split_logits, labels = logits[args.split]
        if len(labels) == 0:
            raise UserError(f"{path} was trained with --holdout 0: it has no hold-out split; use --split test")
        results[path] = {"kind": network.checkpoint["kind"], "arch": network.checkpoint["arch"],
                         "complete": bool(network.checkpoint.get("complete")), "tta": network.tta,
                         "gflops": network.gflops, "holdout_accuracy": accuracy(*logits["holdout"]),
                         **network_scores(split_logits, labels),
                         **speed(network, data, args.split, runtime, args.timed_passes)}
    print_tables(results, args.split, CLASSES, device_name(runtime.device))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, results)
        print(f"\nwrote {args.out}")


def accuracy(logits, labels):
    return (logits.argmax(1) == labels).double().mean().item() if len(labels) else None


def speed(network, data, split, runtime, passes):
    """``{"images_per_s", "images_per_s_range"}`` of ``passes`` timed passes over the split (none for 0)."""
    if not passes:
        return {}
    from utils.data import make_splits
    from utils.routed import timed
    from utils.runtime import batched_logits

    images, _ = make_splits(data, network.split)[split]
    speeds = sorted(len(images) / s for s in timed(lambda: batched_logits(network, images, runtime), runtime,
                                                   passes)[1])
    return {"images_per_s": speeds[len(speeds) // 2], "images_per_s_range": [speeds[0], speeds[-1]]}


def print_tables(results, split, classes, device):
    print(f"\n{split} split; accuracy with its 95% bootstrap interval; NLL; ECE (15 bins); the hold-out split's "
          f"accuracy; GFLOPs per image, test-time views included; images/s on {device}\n")
    print("| Checkpoint | Network | Accuracy | 95% interval | NLL | ECE | Hold-out accuracy | Views | GFLOPs "
          "| Images/s |\n|---|---|---|---|---|---|---|---|---|---|")
    for path, r in results.items():
        name = f"{r['kind']} {r['arch']}" + ("" if r["complete"] else " [unfinished]")
        holdout = "—" if r["holdout_accuracy"] is None else f"{100 * r['holdout_accuracy']:.2f}%"
        images_per_s = f"{r['images_per_s']:.0f}" if "images_per_s" in r else "not measured"
        print(f"| `{path}` | {name} | {100 * r['accuracy']:.2f}% | {100 * r['accuracy_low']:.2f}–"
              f"{100 * r['accuracy_high']:.2f}% | {r['nll']:.3f} | {r['ece']:.4f} | {holdout} | {r['tta']} "
              f"| {r['gflops']:.3f} | {images_per_s} |")
    print("\nPer-class accuracy (%)\n\n| Checkpoint | " + " | ".join(classes) + " |\n|---|" + "---|" * len(classes))
    for path, r in results.items():
        print(f"| `{path}` | " + " | ".join(f"{100 * a:.1f}" for a in r["per_class"]) + " |")


if __name__ == "__main__":
    run(main)
