"""Run the whole pipeline: teacher -> students -> selector -> inference -> published weights, then print each
stage's wall time.

The students (and, with --with-nokd, their no-KD twins) train together in one loop on the same
batches. The selector is trained twice: as itself, and on shuffled labels as a control
(selector_shuffled.pt). The results bundle (utils/bundle.py) goes to a folder of its own, --out or
results/[NAME/]run-<date>-<time>/ (never one that holds anything; built in <folder>.unfinished/ and
moved there once complete): results.md, results.json, the plots, logits.npz and metrics.jsonl; the
published weights of the students and the selector (publish.py) to its weights/ folder, the
teacher's too with --with-teacher-weights (about 45 MiB: more than a GPU job can hand back beside
the rest). With --with-specialists METHOD a pair of specialists trains in the students' loop too,
with its own selector and control, and is routed and published beside them.

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
With --seeds S1 S2 ..., the pipeline runs once per seed (experiment NAME/seed<S>, its bundle in
<out>/seed<S>/) and a table of each row's mean and standard deviation over the seeds is written to
<out>/seeds.md.
Exit codes: 0 done; 2 a refusal (one line saying why); 75 a training stage stopped by
--time-budget; 130/143 stopped by SIGINT/SIGTERM. The command it prints then goes on, in the same
--out (with --seeds, keeping the seeds' bundles it finished).
"""

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import inference
import publish
import StudentTrain
import teacherTrain
import trainSelector
from utils.choices import KD_LOSSES, SPECIALISATIONS
from utils.cli import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    UserError,
    default_data_dir,
    experiment_name,
    make_parser,
    parse,
    print_config,
    run,
)
from utils.recipes import STUDENTS
from utils.runs import RESULTS_ROOT, continue_pipeline_command, selector_stem, student_stem
from utils.split import Split, check_folds, stratified_counts

PRESETS = {
    "smoke": {"name": "smoke", "device": "cpu", "epochs": 1, "split": ["--limit", "20", "--holdout", "100"],
              "train": ["--batch-size", "10", "--log-every", "1"],
              "selector": ["--views", "1", "--folds", "2"]},  # its hold-out split has 2 images of each class
    "full": {"name": "", "device": "auto", "epochs": None, "split": [], "train": [], "selector": []},
}
# Of the time left when it starts, the share of each stage still to run (inference is not time-boxed: its share
# is what is kept for it), for two students in the students' loop; ``shares`` weighs the loop up for more members.
# The generalists' selector stages train --folds + 1 selectors each (utils/selector.py, cross-fitting).
SHARES = {"teacher": 0.38, "students": 0.40, "selector": 0.07, "selector, shuffled-label control": 0.05,
          "inference": 0.10}
SPECIALISTS_SELECTORS = {"specialists' selector": 0.07, "specialists' selector, shuffled-label control": 0.05}
STEPS = ("teacher", "students", "selectors")  # what --retrain-from names: the stages in order, all selectors one


@dataclass
class Stage:
    title: str
    module: object  # the script whose main() trains it
    paths: list  # the checkpoints it writes
    argv: list
    step: str = ""  # what --retrain-from calls it and the stages after it


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--preset", default="full", choices=list(PRESETS), help="which recipe to run")
    parser.add_argument("--name", default=None, type=experiment_name,
                        help="experiment name: checkpoints/NAME/ and results/NAME/ (default: the preset's, "
                             "'smoke' or none)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=SEED, default=0, help="seed of every training stage")
    seeds.add_argument("--seeds", type=SEED, nargs="+",
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
    parser.add_argument("--with-specialists", choices=SPECIALISATIONS, default=None, metavar="METHOD",
                        help="also train a pair of specialists of METHOD (mcl or groups: StudentTrain.py) in the "
                             "students' loop, and their selector and its control, routed beside the generalists")
    parser.add_argument("--out", default=None,
                        help="folder of the results bundle (with --seeds: of each seed's bundle and the summary), "
                             "refused if it holds anything but what this command left when it stopped (default: "
                             "results/[NAME/]run-<date>-<time>/)")
    retrain = parser.add_mutually_exclusive_group()
    retrain.add_argument("--force", action="store_true",
                         help="retrain every stage, replacing what is there, even complete and current checkpoints")
    retrain.add_argument("--retrain-from", choices=STEPS, default=None,
                         help="retrain this stage and every stage after it (which depend on it), keeping the ones "
                              "before")
    parser.add_argument("--with-teacher-weights", action="store_true",
                        help="publish the teacher's weights beside the students' (over the 15 MiB of a published "
                             "file: for your own machines)")
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
    parser = build_parser()
    args = parse(parser, argv)
    repeated = sorted({seed for seed in args.seeds or () if args.seeds.count(seed) > 1})
    if repeated:
        parser.error(f"--seeds repeats seed {repeated[0]}: give each seed once (the summary's spread is over runs)")
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
        control, spec_selector = layout.get("control"), layout.get("spec_selector")
        roles = {"teacher": layout["teacher"], "students": layout["students"][0], "selector": layout["selector"],
                 "selector, shuffled-label control": layout["selector"] if control is None else control}
        if args.with_specialists:
            spec = layout["selector"] if spec_selector is None else spec_selector
            roles |= {"specialists' selector": spec, "specialists' selector, shuffled-label control":
                      spec if layout.get("spec_control") is None else layout["spec_control"]}
        flags = {}
        for title, k in roles.items():
            checkpoint = networks[k].checkpoint
            folds = checkpoint.get("cross_fit", {}).get("epochs")
            for epochs in [checkpoint["epochs"], *(folds or [])]:
                if not isinstance(epochs, int) or epochs < 1:
                    raise UserError(f"--epochs-from {args.epochs_from}: its {title} stage ran {epochs!r} epochs, not "
                                    "a positive whole number; the bundle is damaged")
            flags[title] = ["--epochs", str(checkpoint["epochs"]),
                            *(["--folds", str(len(folds)), "--fold-epochs", *map(str, folds)] if folds else [])]
        return flags
    epochs = args.epochs or (None if args.minutes else PRESETS[args.preset]["epochs"])
    return dict.fromkeys([*SHARES, *SPECIALISTS_SELECTORS], ["--epochs", str(epochs)] if epochs else [])


def shares(args):
    """Each stage's share of the time left when it starts (``SHARES``), with the students' loop weighed up for its
    members beyond two (their no-KD twins, the specialists) and the specialists' selectors where they are trained;
    the inference stage keeps its share."""
    members = 2 * (1 + args.with_nokd + bool(args.with_specialists))
    weights = {**SHARES, "students": SHARES["students"] * (members / 2) ** 0.8,
               **(SPECIALISTS_SELECTORS if args.with_specialists else {})}
    weights.pop("inference")
    trained = sum(weights.values())
    return {**{k: w / trained * (1 - SHARES["inference"]) for k, w in weights.items()},
            "inference": SHARES["inference"]}


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
    kinds = [(True, None), *([(False, None)] if args.with_nokd else []),
             *([(True, args.with_specialists)] if args.with_specialists else [])]
    students = [folder / f"{student_stem(arch, kd, method)}.pt" for arch in STUDENTS.values() for kd, method in kinds]
    plan = [
        Stage("teacher", teacherTrain, [folder / "teacher.pt"], train("teacher", *preset["split"]), "teacher"),
        Stage("students", StudentTrain, students,
              train("students", *preset["split"], "--model", *STUDENTS, "--kd-loss", args.kd_loss,
                    *(["--with-nokd"] if args.with_nokd else []),
                    *(["--with-specialists", args.with_specialists] if args.with_specialists else [])), "students"),
        Stage("selector", trainSelector, [folder / "selector.pt"], train("selector", *preset["selector"]),
              "selectors"),
        Stage("selector, shuffled-label control", trainSelector, [folder / "selector_shuffled.pt"],
              train("selector, shuffled-label control", *preset["selector"], "--shuffle-labels"), "selectors"),
    ]
    if args.with_specialists:  # learned from the training split: its images, without augmented views
        method = ["--specialists", args.with_specialists, *preset["selector"], "--views", "0"]
        plan += [Stage(title, trainSelector, [folder / f"{selector_stem(args.with_specialists, shuffled)}.pt"],
                       train(title, *method, *(["--shuffle-labels"] if shuffled else [])), "selectors")
                 for title, shuffled in zip(SPECIALISTS_SELECTORS, (False, True))]
    return plan, common


def run_pipeline(args, name, seed, fingerprint, out, started=None):
    """One pipeline (``utils.pipeline.run_pipeline``) of the experiment ``name`` with ``seed``, its bundle in
    ``out``."""
    from utils.pipeline import run_pipeline

    plan, common = stages(args, name, seed)
    evaluated = [*common, "--specialists", args.with_specialists or "none"]  # never another run's specialists
    return run_pipeline(args, name, plan, evaluated, shares(args), (inference.main, publish.main), fingerprint, out,
                        started)


def output_folder(args):
    """Where this command writes: --out, or a new ``results/[NAME/]run-<date>-<time>/``. An --out that holds anything
    is refused (a bundle is never replaced), but what this command goes on from after a stop (``goes_on_from``)."""
    if args.out:
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or not all(goes_on_from(entry, args) for entry in out.iterdir())):
            raise UserError(f"--out {out} already holds something; a bundle is written into a new folder: choose "
                            "another --out")
        return out
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    out, k = RESULTS_ROOT / args.name / stamp, 1
    while out.exists():  # two runs in one second
        out, k = RESULTS_ROOT / args.name / f"{stamp}-{k + 1}", k + 1
    return out


def goes_on_from(entry, args):
    """Whether ``entry`` of --out is what a --seeds command left when it stopped, for it to go on from: a seed's
    bundle it finished, one it was building, or the summary."""
    bundles = {f"seed{seed}" for seed in args.seeds or ()}
    kept = {"seeds.md", "seeds.json", *(f"{b}.unfinished" for b in bundles)}
    return (bool(bundles) and entry.name in kept) or (entry.name in bundles and finished(entry, args))


def finished(bundle, args):
    """Whether ``bundle`` is one that this command wrote, to be kept: not with --force or --retrain-from, which train
    its stages again."""
    try:
        command = json.loads((bundle / "results.json").read_text())["pipeline"]["command"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return not (args.force or args.retrain_from) and \
        continue_pipeline_command(command) == continue_pipeline_command(args.command)


def check_plan(args):
    """Every refusal that the stages' flags alone decide, before anything trains: each stage's flags parse, and the
    selectors' folds fit the hold-out split the students will have."""
    plan, _ = stages(args, args.name, args.seed)
    teacher, students, *selectors = plan
    split = Split.from_args(teacherTrain.parse_args(teacher.argv))
    StudentTrain.parse_args(students.argv)
    for stage in selectors:
        flags = trainSelector.build_parser().parse_args(stage.argv)
        try:
            if not args.partial_data:
                check_folds(stratified_counts(split.planned_sizes()["holdout" if split.holdout else "train"]),
                            flags.folds)
        except UserError as e:
            raise UserError(f"the {stage.title} stage would be refused once the students have trained (its flags "
                            f"come from --preset and --epochs-from): {e}") from None


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    out = output_folder(args)
    if not args.out:  # the command that goes on after a stop writes there too
        args.command = shlex.join([*shlex.split(args.command), "--out", str(out)])
    check_plan(args)
    from utils.data import check_source, load_cifar10  # after the flags: --help and a refused flag need no torch
    from utils.pipeline import summarise

    check_source(args.data_dir, args.download)
    print_config(args, "reproduce.py")
    fingerprint = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data).fingerprint
    if not args.seeds:
        run_pipeline(args, args.name, args.seed, fingerprint, out, started)
        return
    for seed in args.seeds:
        if finished(out / f"seed{seed}", args):
            print(f"\n######## seed {seed}: its bundle {out / f'seed{seed}'}/ is complete, kept")
            continue
        print(f"\n######## seed {seed}")
        run_pipeline(args, str(Path(args.name) / f"seed{seed}"), seed, fingerprint, out / f"seed{seed}")
    summarise(out, {seed: out / f"seed{seed}" for seed in args.seeds})


if __name__ == "__main__":
    run(main)
