"""Run the whole pipeline: teacher -> students -> selector -> inference -> published weights, then print each
stage's wall time.

The students (and, with --with-nokd, their no-KD twins) train together in one loop on the same
batches. The selector is trained twice: as itself, and on shuffled labels as a control
(selector_shuffled.pt). The results bundle (utils/bundle.py) goes to results/NAME/bundle/:
results.md, results.json, the plots, logits.npz and metrics.jsonl; the published weights of the
students and the selector (publish.py) to its weights/ folder, the teacher's too with
--with-teacher-weights (about 45 MiB: more than a GPU job can hand back beside the rest).

A stage whose checkpoints are complete and up to date is skipped; an interrupted one resumes. A
stale one (trained from another teacher, other students, other data or other flags, another
--seed included) stops the command with its reason: nothing complete is ever deleted without
--force (which retrains every stage), or write the new run elsewhere with --name.

--minutes M boxes the whole pipeline, data decoding and start-up included, in M minutes: each
training stage gets a share of what is left when it starts (printed at the start; a stage that
ends early hands its time on), measures its own speed and chooses its epochs (utils/engine.py).
--epochs-from BUNDLE trains every stage with the epochs that bundle's run chose (each fold selector's too).
Presets:
  smoke  CPU, a small stratified subset, one epoch per stage: the pipeline end to end in about a
         minute, for trying the repository and for CI (experiment name "smoke")
  full   the GPU recipe: each network's recipe (utils/recipes.py)
With --seeds S1 S2 ..., the pipeline runs once per seed (experiment NAME/seed<S>) and a table of
each row's mean and standard deviation over the seeds is written to results/NAME/seeds.md.
Exit codes: 0 done; 2 a refusal (one line saying why); 75 a training stage stopped by
--time-budget; 130/143 stopped by SIGINT/SIGTERM. Run the same command again to go on.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import inference
import publish
import StudentTrain
import teacherTrain
import trainSelector
from utils.choices import KD_LOSSES
from utils.cli import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    default_data_dir,
    experiment_name,
    make_parser,
    parse,
    print_config,
    run,
)
from utils.recipes import STUDENTS
from utils.runs import student_stem

PRESETS = {
    "smoke": {"name": "smoke", "device": "cpu", "epochs": 1, "split": ["--limit", "20", "--holdout", "100"],
              "train": ["--batch-size", "10", "--log-every", "1"],
              "selector": ["--views", "1", "--folds", "2"]},  # its hold-out split has 2 images of each class
    "full": {"name": "", "device": "auto", "epochs": None, "split": [], "train": [], "selector": []},
}
# Of the time left when it starts, the share of each stage still to run (inference is not time-boxed: its share
# is what is kept for it). With --with-nokd the students' loop trains twice as many networks.
# The selector stages train --folds + 1 selectors each (utils/routing.py, cross-fitting).
SHARES = {"teacher": 0.38, "students": 0.40, "selector": 0.07, "selector, shuffled-label control": 0.05,
          "inference": 0.10}
SHARES_WITH_NOKD = {**SHARES, "teacher": 0.28, "students": 0.52, "selector": 0.06,
                    "selector, shuffled-label control": 0.04}


@dataclass
class Stage:
    title: str
    module: object  # the script whose main() trains it
    paths: list  # the checkpoints it writes
    argv: list


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--preset", default="full", choices=list(PRESETS), help="which recipe to run")
    parser.add_argument("--name", default=None, type=experiment_name,
                        help="experiment name: checkpoints/NAME/ and results/NAME/ (default: the preset's, "
                             "'smoke' or none)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seed of every training stage")
    seeds.add_argument("--seeds", type=NON_NEGATIVE_INT, nargs="+",
                       help="run the pipeline once per seed (experiments NAME/seed<S>) and summarise them")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=POSITIVE_INT, default=None,
                        help="epochs of every training stage (default: the preset's, else each network's recipe)")
    length.add_argument("--minutes", type=POSITIVE, default=None,
                        help="a time box for the whole pipeline: each training stage gets a share of the time left "
                             "and chooses its epochs to fit it")
    length.add_argument("--epochs-from", default=None, metavar="BUNDLE",
                        help="train each stage with the epochs the run that wrote this results bundle chose")
    parser.add_argument("--kd-loss", default="kl", choices=KD_LOSSES, help="KD loss of the students")
    parser.add_argument("--with-nokd", action="store_true",
                        help="also train both students without KD, in the students' loop, for the KD-gain rows")
    parser.add_argument("--with-teacher-weights", action="store_true",
                        help="publish the teacher's weights beside the students' (over the 15 MiB of a published "
                             "file: for your own machines)")
    parser.add_argument("--force", action="store_true",
                        help="retrain every stage, replacing what is there, even complete and current checkpoints")
    parser.add_argument("--time-budget", type=NON_NEGATIVE, default=None,
                        help="minutes after which a training stage saves and stops; rerun the same command to go on")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                        help="device of every stage (default: the preset's: cpu for smoke, auto for full)")
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="CIFAR-10 location; the environment variable CIFAR10_DIR sets the default")
    parser.add_argument("--download", action="store_true", help="download the official CIFAR-10 if it is missing")
    parser.add_argument("--partial-data", action="store_true",
                        help="accept a CIFAR-10 copy with fewer images than the official one")
    return parser


def parse_args(argv=None):
    args = parse(build_parser(), argv)
    preset = PRESETS[args.preset]
    args.name = preset["name"] if args.name is None else args.name
    args.device = args.device or preset["device"]
    return args


def stage_epochs(args):
    """``{stage title: [--epochs flags]}``: the user's, a bundle's chosen ones (each fold selector's too), or the
    preset's (none: the recipe's or a time box's)."""
    if args.epochs_from:
        from utils.bundle import read_bundle  # numpy and torch: after the flags

        results, networks = read_bundle(args.epochs_from)
        layout = results["layout"]
        roles = {"teacher": layout["teacher"], "students": layout["students"][0], "selector": layout["selector"],
                 "selector, shuffled-label control": layout["control"] if layout["control"] is not None
                 else layout["selector"]}
        flags = {}
        for title, k in roles.items():
            checkpoint = networks[k].checkpoint
            folds = checkpoint.get("cross_fit", {}).get("epochs")
            flags[title] = ["--epochs", str(checkpoint["epochs"]),
                            *(["--folds", str(len(folds)), "--fold-epochs", *map(str, folds)] if folds else [])]
        return flags
    epochs = args.epochs or (None if args.minutes else PRESETS[args.preset]["epochs"])
    return dict.fromkeys(SHARES, ["--epochs", str(epochs)] if epochs else [])


def stages(args, name, seed):
    """``([Stage], common flags of inference.py)`` of one pipeline run."""
    preset = PRESETS[args.preset]
    data = ["--data-dir", args.data_dir, *(["--download"] if args.download else []),
            *(["--partial-data"] if args.partial_data else [])]
    common = ["--name", name, "--device", args.device, *data]
    epochs = stage_epochs(args)

    def train(title, *flags):  # the epochs last: a bundle's --folds goes with its --fold-epochs
        return [*common, *preset["train"], "--seed", str(seed), *flags, *epochs[title],
                *(["--time-budget", str(args.time_budget)] if args.time_budget is not None else [])]

    folder = Path("checkpoints") / name
    kinds = [True, False] if args.with_nokd else [True]
    students = [folder / f"{student_stem(arch, kd)}.pt" for arch in STUDENTS.values() for kd in kinds]
    return [
        Stage("teacher", teacherTrain, [folder / "teacher.pt"], train("teacher", *preset["split"])),
        Stage("students", StudentTrain, students,
              train("students", *preset["split"], "--model", *STUDENTS, "--kd-loss", args.kd_loss,
                    *(["--with-nokd"] if args.with_nokd else []))),
        Stage("selector", trainSelector, [folder / "selector.pt"], train("selector", *preset["selector"])),
        Stage("selector, shuffled-label control", trainSelector, [folder / "selector_shuffled.pt"],
              train("selector, shuffled-label control", *preset["selector"], "--shuffle-labels")),
    ], common


def run_pipeline(args, name, seed, fingerprint, started=None):
    """One pipeline (``utils.pipeline.run_pipeline``) of the experiment ``name`` with ``seed``."""
    from utils.pipeline import run_pipeline

    plan, common = stages(args, name, seed)
    shares = SHARES_WITH_NOKD if args.with_nokd else SHARES
    return run_pipeline(args, name, plan, common, shares, (inference.main, publish.main), fingerprint, started)


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    print_config(args, "reproduce.py")
    from utils.data import load_cifar10  # after the flags: --help and a refused flag need no torch
    from utils.pipeline import summarise

    fingerprint = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data).fingerprint
    if not args.seeds:
        run_pipeline(args, args.name, args.seed, fingerprint, started)
        return
    for seed in args.seeds:
        print(f"\n######## seed {seed}")
        run_pipeline(args, str(Path(args.name) / f"seed{seed}"), seed, fingerprint)
    summarise(args.name, args.seeds)


if __name__ == "__main__":
    run(main)
