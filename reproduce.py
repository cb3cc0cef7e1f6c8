"""Run the whole pipeline: teacher -> students -> selector -> inference, then print each stage's wall time.

A stage whose checkpoint is complete and up to date is skipped; an interrupted one resumes; a
stale one (trained from another teacher, other students, other data or other flags) is
trained again. --force retrains every stage.
Presets:
  smoke  CPU, a small stratified subset, one epoch per stage: the pipeline end to end in about a
         minute, for trying the repository and for CI (experiment name "smoke")
  full   the GPU recipe behind the README's table: each network's recipe (utils/recipes.py)
The selector is trained twice: as itself, and on shuffled labels as a control (selector_shuffled.pt).
With --seeds S1 S2 ..., the pipeline runs once per seed (experiment NAME/seed<S>) and a table of
each row's mean and standard deviation over the seeds is written to results/NAME/seeds.md.
"""

import json
import statistics
import time
from pathlib import Path

import inference
import StudentTrain
import teacherTrain
import trainSelector
from utils.checkpoint import load_checkpoint
from utils.cli import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    default_data_dir,
    make_parser,
    parse,
    print_config,
    run,
)
from utils.data import load_cifar10
from utils.losses import KD_LOSSES
from utils.recipes import STUDENTS
from utils.runs import RESULTS_ROOT, RunFiles, config_changes, student_stem

PRESETS = {
    "smoke": {"name": "smoke", "device": "cpu", "split": ["--limit", "20", "--holdout", "100"],
              "train": ["--epochs", "1", "--batch-size", "10", "--log-every", "1"], "selector": ["--views", "1"]},
    "full": {"name": "", "device": "auto", "split": [], "train": [], "selector": []},
}


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--preset", default="full", choices=list(PRESETS), help="which recipe to run")
    parser.add_argument("--name", default=None,
                        help="experiment name: checkpoints/NAME/ and results/NAME/ (default: the preset's, "
                             "'smoke' or none)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seed of every training stage")
    seeds.add_argument("--seeds", type=NON_NEGATIVE_INT, nargs="+",
                       help="run the pipeline once per seed (experiments NAME/seed<S>) and summarise them")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=None,
                        help="epochs of every training stage (default: the preset's, else each script's own)")
    parser.add_argument("--kd-loss", default="kl", choices=KD_LOSSES, help="KD loss of the students")
    parser.add_argument("--with-nokd", action="store_true",
                        help="also train both students without KD (same recipe), for the KD-versus-no-KD rows")
    parser.add_argument("--force", action="store_true", help="retrain every stage, even those complete and current")
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


def stages(args, name, seed):
    """``[(title, script module, checkpoint, argv)]`` of one pipeline run."""
    preset = PRESETS[args.preset]
    data = ["--data-dir", args.data_dir, *(["--download"] if args.download else []),
            *(["--partial-data"] if args.partial_data else [])]
    common = ["--name", name, "--device", args.device, *data]
    train = [*common, *preset["train"], "--seed", str(seed), *(["--epochs", str(args.epochs)] if args.epochs else []),
             *(["--time-budget", str(args.time_budget)] if args.time_budget is not None else [])]
    ckpt = Path("checkpoints") / name
    result = [("teacher", teacherTrain, ckpt / "teacher.pt", [*train, *preset["split"]])]
    kd = [True, False] if args.with_nokd else [True]
    for with_kd in kd:
        for number, arch in STUDENTS.items():
            title = f"student {number} ({arch})" + ("" if with_kd else " without KD")
            result.append((title, StudentTrain, ckpt / f"{student_stem(arch, with_kd)}.pt",
                           [*train, *preset["split"], "--model", number,
                            *(["--kd-loss", args.kd_loss] if with_kd else ["--no-kd"])]))
    result.append(("selector", trainSelector, ckpt / "selector.pt", [*train, *preset["selector"]]))
    result.append(("selector, shuffled-label control", trainSelector, ckpt / "selector_shuffled.pt",
                   [*train, *preset["selector"], "--shuffle-labels"]))
    return result, common


def _peek(path):
    return load_checkpoint(path, hint="python reproduce.py --force")


def stage_state(module, path, argv, fingerprint):
    """``(state, why)``: 'complete', 'partial' (resumable), 'stale' (to retrain) or 'missing'."""
    files = RunFiles.of(path)
    if not files.best.exists() and not files.last.exists():
        return "missing", ""
    checkpoint = _peek(files.last if files.last.exists() else files.best)
    parsed = module.parse_args(argv)
    expected = next(run for run in parsed if run.checkpoint == str(path)) if isinstance(parsed, list) else parsed
    changed = config_changes(checkpoint["config"], vars(expected))
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


def run_pipeline(args, name, seed, fingerprint):
    """Train every stage that needs it, then run inference; returns the stage wall times, or None if stopped."""
    wall = {}
    plan, common = stages(args, name, seed)
    for title, module, path, argv in plan:
        state, why = ("missing", "") if args.force else stage_state(module, path, argv, fingerprint)
        if state == "complete":
            print(f"== {title}: {path} is complete, skipped (--force reruns it)")
            continue
        note = {"partial": " (resuming)", "stale": f" (stale: {why}; retraining)"}.get(state, "")
        print(f"== {title} -> {path}{note}")
        flag = {"partial": ["--resume"], "stale": ["--force"]}.get(state, ["--force"] if args.force else [])
        start = time.time()
        module.main([*argv, *flag])
        wall[title] = time.time() - start
        if not load_checkpoint(path, hint="python reproduce.py").get("complete"):
            print(f"{title} stopped before its last epoch; run the same command again to continue")
            report(wall)
            return None
    start = time.time()
    inference.main([*common, "--out", str(RESULTS_ROOT / name)])
    wall["inference"] = time.time() - start
    report(wall)
    return wall


def report(wall):
    print("\nwall time per stage (this invocation):")
    for name, seconds in wall.items():
        print(f"  {name:<36} {seconds / 60:7.2f} min")
    print(f"  {'total':<36} {sum(wall.values()) / 60:7.2f} min")


def summarise(name, seeds):
    """``results/NAME/seeds.md`` and ``.json``: each row's mean and standard deviation over the seeds."""
    runs = {seed: json.loads((RESULTS_ROOT / name / f"seed{seed}" / "results.json").read_text()) for seed in seeds}
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
    args = parse_args(argv)
    print_config(args, "reproduce.py")
    fingerprint = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data).fingerprint
    if not args.seeds:
        run_pipeline(args, args.name, args.seed, fingerprint)
        return
    for seed in args.seeds:
        print(f"\n######## seed {seed}")
        if run_pipeline(args, str(Path(args.name) / f"seed{seed}"), seed, fingerprint) is None:
            return
    summarise(args.name, args.seeds)


if __name__ == "__main__":
    run(main)
