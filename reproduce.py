"""Run the whole pipeline: teacher -> students -> selector -> inference, then print each stage's wall time.

The students (and, with --with-nokd, their no-KD twins) train together in one loop on the same
batches. The selector is trained twice: as itself, and on shuffled labels as a control
(selector_shuffled.pt). The results bundle (utils/bundle.py) goes to results/NAME/bundle/:
results.md, results.json, the plots, logits.npz and metrics.jsonl.

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

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import inference
import StudentTrain
import teacherTrain
import trainSelector
from utils.bundle import METRICS, bundle_sizes, read_bundle
from utils.checkpoint import load_checkpoint
from utils.cli import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    UserError,
    default_data_dir,
    experiment_name,
    make_parser,
    parse,
    print_config,
    run,
)
from utils.data import load_cifar10
from utils.losses import KD_LOSSES
from utils.recipes import STUDENTS
from utils.report import write_results
from utils.runs import RESULTS_ROOT, RunFiles, config_changes, continued_by, student_stem

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


def _peek(path):
    return load_checkpoint(path, hint="python reproduce.py --force")


def checkpoint_state(path, expected, fingerprint):
    """``(state, why)`` of one checkpoint against the flags ``expected`` of the run that should write it:
    'complete', 'partial' (resumable), 'stale' (trained otherwise) or 'missing'."""
    files = RunFiles.of(path)
    if not files.best.exists() and not files.last.exists():
        return "missing", ""
    checkpoint = _peek(files.last if files.last.exists() else files.best)
    changed = config_changes(checkpoint["config"], vars(expected))
    if expected.minutes is not None and checkpoint["config"].get("minutes") is not None:
        changed = [k for k in changed if k != "epochs"]  # each time box chose its own
    inputs = [("teacher", checkpoint["teacher"])] if checkpoint.get("teacher") else []
    inputs += [(f"student {k}", s) for k, s in enumerate(checkpoint.get("students", []), 1)]
    moved = [what for what, record in inputs
             if not Path(record["path"]).exists()
             or _peek(record["path"])["weights_sha256"] != record["weights_sha256"]]
    if checkpoint.get("data_fingerprint") != fingerprint:
        return "stale", "trained on other data"
    if moved:
        return "stale", f"its {' and '.join(moved)} changed since"
    if changed:
        return "stale", "trained with other flags: " + ", ".join(f"--{k.replace('_', '-')}" for k in changed)
    complete = files.best.exists() and _peek(files.best).get("complete")
    return ("complete", "") if complete else ("partial", "")


def stage_state(stage, fingerprint, time_boxed=False):
    """``(state, why)`` of a stage: that of its checkpoints when they agree; a mix of complete and missing
    ones is 'stale' too (its loop cannot train some of them alone). ``time_boxed``: it is to run with --minutes."""
    try:
        parsed = stage.module.parse_args([*stage.argv, *(["--minutes", "1"] if time_boxed else [])])
    except UserError as e:  # what the stage reads (the selector's students) is not there
        if any(RunFiles.of(path).last.exists() or Path(path).exists() for path in stage.paths):
            return "stale", str(e)
        return "missing", ""
    expected = {run.checkpoint: run for run in parsed} if isinstance(parsed, list) else {parsed.checkpoint: parsed}
    states = {path: checkpoint_state(path, expected[str(path)], fingerprint) for path in stage.paths}
    stale = [(path, why) for path, (state, why) in states.items() if state == "stale"]
    if stale:
        path, why = stale[0]
        return "stale", why if len(stage.paths) == 1 else f"{path} {why}"
    kinds = {state for state, _ in states.values()}
    if len(kinds) > 1:
        return "stale", ", ".join(f"{path} {state}" for path, (state, _) in states.items())
    return kinds.pop(), ""


def stage_budget(deadline, plan, title, shares):
    """Minutes for stage ``title``: its share of the time left, among the stages that still have to run."""
    left = deadline - time.time()
    share = shares[title] / sum(shares[t] for t in [*plan, "inference"])
    return max(left * share, 1.0) / 60


def run_pipeline(args, name, seed, fingerprint, started=None):
    """Train every stage that needs it, then run inference into the results bundle; returns the stage wall times.

    A stage stopped early (a signal, --time-budget) ends the process with its exit code, after the wall times.
    """
    started = started or time.time()
    deadline = started + 60 * args.minutes if args.minutes else None
    shares = SHARES_WITH_NOKD if args.with_nokd else SHARES
    plan, common = stages(args, name, seed)

    def state_of(stage):
        state, why = ("missing", "") if args.force else stage_state(stage, fingerprint, bool(deadline))
        if state == "stale":
            raise UserError(f"the {stage.title} stage of experiment '{name}' is stale ({why}); nothing was deleted: "
                            "retrain every stage with --force, or write this run elsewhere with --name")
        return state

    states = {stage.title: state_of(stage) for stage in plan}  # a stale stage stops the pipeline before any work
    to_run = [stage.title for stage in plan if states[stage.title] != "complete"]
    if deadline:
        print(f"time box of {args.minutes:g} min, shared when each stage starts: " + ", ".join(
            f"{t} {100 * shares[t]:.0f}%" for t in [*to_run, "inference"]))
    wall = {}
    for stage in plan:
        state = state_of(stage) if wall else states[stage.title]  # what the stages before it trained may change it
        paths = ", ".join(map(str, stage.paths))
        if state == "complete":
            print(f"== {stage.title}: {paths} complete, skipped (--force retrains it)")
            continue
        print(f"== {stage.title} -> {paths}" + (" (resuming)" if state == "partial" else ""))
        flags = {"partial": ["--resume"]}.get(state, ["--force"] if args.force or _leftovers(stage) else [])
        if deadline:
            flags += ["--minutes", f"{stage_budget(deadline, to_run, stage.title, shares):.4f}"]
        to_run.remove(stage.title)
        start = time.time()
        try:
            with continued_by(args.command):
                stage.module.main([*stage.argv, *flags])
        except SystemExit:
            wall[stage.title] = time.time() - start
            print(f"{stage.title} stopped before its end; run the same command again to go on")
            report(wall)
            raise
        wall[stage.title] = time.time() - start
    out = RESULTS_ROOT / name / "bundle"
    start = time.time()
    inference.main([*common, "--out", str(out)])
    wall["inference"] = time.time() - start
    finish_bundle(out, plan, wall, args, time.time() - started)
    report(wall)
    return wall


def _leftovers(stage):
    """Whether a missing stage left files that a fresh run must replace (an unresumable start)."""
    return any(path.exists() for p in stage.paths for path in RunFiles.of(p))


def finish_bundle(out, plan, wall, args, total_seconds):
    """Add to the bundle every stage's training log (``metrics.jsonl``) and the pipeline's wall times."""
    with open(out / METRICS, "w") as f:
        for stage in plan:
            for path in stage.paths:
                log = RunFiles.of(path).log
                for line in log.read_text().splitlines() if log.exists() else []:
                    f.write(json.dumps({"run": str(path), **json.loads(line)}) + "\n")
    results = json.loads((out / "results.json").read_text())
    results["pipeline"] = {"command": args.command, "minutes": args.minutes, "stages": wall,
                           "total_seconds": total_seconds}
    write_results(results, out)
    files, within = bundle_sizes(out)
    if not within:
        print(f"warning: the bundle {out} is larger than a bundle kept in git may be: "
              + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in files))


def report(wall):
    print("\nwall time per stage (this invocation):")
    for name, seconds in wall.items():
        print(f"  {name:<36} {seconds / 60:7.2f} min")
    print(f"  {'total':<36} {sum(wall.values()) / 60:7.2f} min")


def summarise(name, seeds):
    """``results/NAME/seeds.md`` and ``.json``: each row's mean and standard deviation over the seeds."""
    runs = {seed: json.loads((RESULTS_ROOT / name / f"seed{seed}" / "bundle" / "results.json").read_text())
            for seed in seeds}
    rows = {}
    for seed, results in runs.items():
        for row, acc in results["accuracy"].items():
            rows.setdefault(row, []).append(100 * acc)
        for row, gain in results.get("kd_gain", {}).items():
            rows.setdefault(f"KD gain: {row}", []).append(100 * gain["difference"])
    summary = {row: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
               for row, v in rows.items()}
    out = RESULTS_ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps({"seeds": seeds, "rows": summary}, indent=2) + "\n")
    lines = [f"# Results over seeds {', '.join(map(str, seeds))}", "",
             "Test accuracy in %, mean ± sample standard deviation over the seeds (one full pipeline per seed).", "",
             "| Row | Mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds),
             *[f"| {row} | {s['mean']:.2f} ± {s['std']:.2f} | " + " | ".join(f"{v:.2f}" for v in s["values"]) + " |"
               for row, s in summary.items()], ""]
    (out / "seeds.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out / 'seeds.md'} and {out / 'seeds.json'}")


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    print_config(args, "reproduce.py")
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
