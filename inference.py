"""Evaluate the teacher, the students and the routed systems on the CIFAR-10 test set.

Every network's logits on the hold-out and test splits are computed once per checkpoint
(``<stem>.logits.pt``). The routing policies of utils/policies.py are fitted on the whole hold-out
split only — the selector's scores there are out-of-fold, each image's from a selector that never
trained on it (trainSelector.py) — and then applied to the test split:
  cascade   run the students cheapest first; while the answer so far (temperature-scaled,
            averaged) is unsure, run the next and average it in
  deferral  the same, with a learned decision: the predicted gain of running the next (how
            often it helps minus how often it hurts)
  selector  the selector CNN looks at the image and sends it to one student, by its predicted
            gain per extra GFLOP
--router and --budget (a multiple of the cheapest student's GFLOPs) choose the routed system of
the headline row. For comparison: each student, the no-KD twins where StudentTrain.py --no-kd
wrote them, the ensemble, selector routing, random routing at its shares (200 draws, charged
the selector's GFLOPs), the selector trained on shuffled labels (selector_shuffled.pt, if
present) and its random routing, the cascade to the teacher (the students, then the teacher as
the last resort) and the oracle, with paired bootstrap intervals and McNemar tests; the
selector's thresholds and routed accuracy over its folds; each policy at fixed budgets (the
test cost beside each budget); and the cost at which each policy reaches the teacher's
accuracy (utils/analyses.py). Writes, in results/[NAME/], a results bundle (utils/bundle.py):
results.md, results.json, the plots and logits.npz.

--bundle DIR does all of it again from a bundle alone (no checkpoints, no data, no GPU): the
same tables and plots, the measured costs copied from the bundle.

--weights FOLDER evaluates published weights (publish.py; docs/weights.md) instead of checkpoints: the
students and the selector, and the teacher where it is published; else the teacher's logits are
those of the bundle the folder sits in (not run again, so no speed is measured). Each network's
test accuracy is printed beside the one its manifest holds, with the difference.
"""

from pathlib import Path

from utils.cli import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    UserError,
    add_data_args,
    add_device_args,
    add_routing_args,
    make_parser,
    parse,
    print_config,
    run,
)
from utils.choices import SPECIALISATIONS
from utils.published import published_paths, student_paths
from utils.runs import (
    RESULTS_ROOT,
    check_output_folder,
    continue_command,
    default_checkpoint,
    default_students,
    final_command,
    final_path,
    write_files_atomically,
)


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    add_routing_args(parser)
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (default: checkpoints/[NAME/]teacher.pt)")
    parser.add_argument("--specialists", choices=("auto", "none", *SPECIALISATIONS), default="auto",
                        help="route a method's specialists beside the students (StudentTrain.py --with-specialists, "
                             "trainSelector.py --specialists): their checkpoints beside the students' and the "
                             "selector's, <stem>_<method>.pt; auto: the method whose are there, if any")
    parser.add_argument("--bundle", default=None, metavar="DIR",
                        help="analyse a results bundle (a folder with results.json and logits.npz) instead of "
                             "checkpoints: no data, no network is run; the costs are the bundle's")
    parser.add_argument("--weights", default=None, metavar="FOLDER",
                        help="evaluate the published weights in FOLDER (publish.py) instead of checkpoints; without "
                             "a published teacher (or --teacher), the teacher's logits are those of the bundle "
                             "FOLDER sits in")
    parser.add_argument("--out", default=None,
                        help="folder for results.md, results.json, the plots and logits.npz, beside anything else "
                             "there (default: results/[NAME/], or with --bundle or --weights results/reanalysed/<the "
                             "bundle folder's name>); never the bundle read")
    parser.add_argument("--force", action="store_true", help="replace the results already in --out")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=1024, help="images per forward pass")
    parser.add_argument("--timed-passes", type=NON_NEGATIVE_INT, default=None,
                        help="timed passes over the test split for each system's images/s, after an untimed one "
                             "(the median and range are reported); 0 measures no speed, GFLOPs only (default: 3 on "
                             "a GPU, 0 on a CPU, whose speeds say nothing of a GPU's)")
    add_data_args(parser)
    add_device_args(parser, compile=False, seed=False)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parse(parser, argv)
    if args.weights and (args.students or args.selector or args.bundle):
        parser.error("--weights gives the students and the selector: give --weights, or --students and --selector "
                     "(or --bundle), not both")
    if args.weights:
        paths = published_paths(args.weights)
        args.students, args.selector = student_paths(paths), paths["selector"]
        args.teacher = args.teacher or paths.get("teacher")  # None: the logits of the bundle the folder sits in
    else:
        args.teacher = args.teacher or default_checkpoint(args.name, "teacher")
    args.students = args.students or default_students(args.name)
    args.selector = args.selector or default_checkpoint(args.name, "selector")
    source = args.bundle or (Path(args.weights).resolve().parent if args.weights else None)
    args.out = args.out or str(RESULTS_ROOT / ("reanalysed" / Path(Path(source).resolve().name) if source
                                               else args.name))
    return args


def check_out(args):
    """Refuse a --bundle that is none, an --out that is (or is inside) the bundle read, or that already holds results
    without --force; and one that cannot be written."""
    out = Path(args.out).resolve()
    if args.bundle:
        from utils.bundle import check_bundle_folder  # numpy and torch: after the flags

        bundle = check_bundle_folder(args.bundle).resolve()
        if out == bundle or bundle in out.parents:
            raise UserError(f"--out {args.out} is the bundle being re-analysed, and a re-analysis never writes into "
                            "the bundle it reads; choose another --out")
    if not args.force and any((out / name).exists() for name in ("results.json", "results.md", "logits.npz")):
        raise UserError(f"{args.out} already holds results; add --force to replace them, or choose another --out")
    check_output_folder(args.out, "--out")


def main(argv=None):
    args = parse_args(argv)
    check_out(args)
    if args.bundle:
        return analyse_bundle(args)
    import torch  # after the flags: --help and a refused flag need no torch

    from utils.analyses import analyse, describe
    from utils.data import load_cifar10, make_splits
    from utils.experiment import load_networks, students_split
    from utils.runtime import device_name, setup_runtime, stoppable
    from utils.speed import measure_speed

    split = students_split(args.students, args.name)
    runtime = setup_runtime(args, varying_shapes=True)
    print_config(args, "inference.py")
    data = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data)
    with stoppable("evaluating the networks (the logits computed so far are kept)",
                   continue_command(args.command, saved=False)):
        networks = load_networks(args, runtime, data)
        results, systems = analyse(networks, args.router, args.budget)
        images, labels = make_splits(data, split)["test"]
        passes = (3 if runtime.cuda else 0) if args.timed_passes is None else args.timed_passes
        if passes and args.teacher:
            results["costs"] = measure_speed(networks, systems, results, images, runtime, args.batch_size, passes)
    if not args.teacher:
        results["teacher_from_bundle"] = str(Path(args.weights).parent)
    if args.weights:
        results["published_weights"] = against_manifest(networks, results, args.weights)
    results.update(
        describe(networks, split), test_images=len(labels), device=device_name(runtime.device),
        torch=str(torch.__version__), batch_size=args.batch_size, command=final_command(args.command),
        data=f"data fingerprint {data.fingerprint}" + (f", stratified --limit {split.limit}" if split.limit else ""))
    write(results, networks, Path(args.out))
    if args.weights:
        print_against_manifest(results["published_weights"])


SYSTEM_OF = {"spec_selector": "spec:selector"}  # a network whose accuracy is that of another id's system


def against_manifest(networks, results, folder):
    """Each published network's test accuracy here (a selector's: that of its selector routing) and in its
    manifest, by id, with the device that measured the manifest's."""
    from utils.published import read_manifest

    manifest = read_manifest(folder)
    entries = {k: e for k, e in manifest["networks"].items() if k in networks.ids()}
    return {"folder": folder, "measured": manifest["measured"]["device"],
            "test_accuracy": {k: {"here": results["accuracy"][SYSTEM_OF.get(k, k)], "manifest": e["accuracy"]["test"]}
                              for k, e in entries.items()}}


def print_against_manifest(comparison):
    print(f"\npublished weights {comparison['folder']}: test accuracy here, and in the manifest (measured on "
          f"{comparison['measured']})")
    for k, acc in comparison["test_accuracy"].items():
        print(f"  {k:<14} {100 * acc['here']:.2f}%  manifest {100 * acc['manifest']:.2f}%  "
              f"({100 * (acc['here'] - acc['manifest']):+.2f} points)")


def analyse_bundle(args):
    """Every table and plot again from a bundle: the same figures, from its logits alone."""
    from utils.analyses import analyse, describe
    from utils.bundle import networks_of_bundle

    bundle, networks = networks_of_bundle(args.bundle)
    results, _ = analyse(networks, args.router, args.budget)
    kept = ("costs", "test_images", "device", "torch", "batch_size", "command", "data", "pipeline")
    results.update(describe(networks, networks.students[0].split), **{k: bundle[k] for k in kept if k in bundle},
                   reanalysis=f"re-analysed from the bundle {args.bundle} by `{args.command}`")
    write(results, networks, Path(args.out))


def write(results, networks, out):
    """The results bundle in ``out``, all of it or none: results.md, results.json, the plots and every network's
    logits, beside anything else there (reproduce.py's bundles, published weights)."""
    from utils.bundle import LOGITS, write_logits
    from utils.report import write_report

    def write_bundle(folder):
        write_report(results, folder)
        write_logits(networks, folder / LOGITS)

    write_files_atomically(out, write_bundle)
    print((out / "results.md").read_text())
    shown = final_path(out)
    print(f"wrote {shown / 'results.md'}, {shown / 'results.json'}, {LOGITS} and the plots in {shown}/")


if __name__ == "__main__":
    run(main)
