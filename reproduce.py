"""Run the whole pipeline: teacher -> students -> selector -> inference, then print each stage's wall time.

A stage whose checkpoint is complete is skipped (unless --force); an interrupted one resumes.
Presets:
  smoke  CPU, a small stratified subset, one epoch per stage: the pipeline end to end in a few
         minutes, for trying the repository and for CI (writes checkpoints/smoke/, results/smoke/)
  full   the GPU recipe behind the README's table: every script's defaults plus --compile
         (writes checkpoints/, results/)
"""

import time
from pathlib import Path

import StudentTrain
import inference
import teacherTrain
import trainSelector
from utils.checkpoint import load_checkpoint
from utils.cli import make_parser, run

PRESETS = {
    "smoke": {"dir": "smoke", "common": ["--device", "cpu", "--limit", "50", "--holdout", "200"],
              "train": ["--epochs", "1", "--batch-size", "25", "--log-every", "1"],
              "selector": ["--views", "1"]},
    "full": {"dir": "", "common": [], "train": ["--compile"], "selector": []},
}


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--preset", default="full", choices=list(PRESETS), help="which recipe to run")
    parser.add_argument("--force", action="store_true", help="rerun every stage, even those already complete")
    parser.add_argument("--with-nokd", action="store_true",
                        help="also train both students without KD (same recipe), for the KD-versus-no-KD rows")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="minutes after which a training stage saves and stops; rerun the same command to go on")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 location (default: $CIFAR10_DIR, else data/)")
    parser.add_argument("--download", action="store_true", help="download the official CIFAR-10 if it is missing")
    return parser.parse_args(argv)


def stage_state(path):
    """'complete', 'partial' (resumable) or 'missing'."""
    if Path(path).exists() and load_checkpoint(path, hint="python reproduce.py --force").get("complete"):
        return "complete"
    return "partial" if Path(path).with_suffix(".last.pt").exists() else "missing"


def main(argv=None):
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    ckpt_dir = Path("checkpoints") / preset["dir"]
    results_dir = Path("results") / preset["dir"]
    common = preset["common"] + (["--data-dir", args.data_dir] if args.data_dir else []) + \
        (["--download"] if args.download else [])
    train = common + preset["train"] + (["--time-budget", str(args.time_budget)] if args.time_budget else [])
    teacher, selector = ckpt_dir / "teacher.pt", ckpt_dir / "selector.pt"
    students = [ckpt_dir / f"student_{arch}.pt" for arch in StudentTrain.STUDENTS.values()]

    stages = [("teacher", teacherTrain.main, teacher, train)]
    for (number, arch), path in zip(StudentTrain.STUDENTS.items(), students):
        stages.append((f"student {number} ({arch})", StudentTrain.main, path,
                       train + ["--model", number, "--teacher", str(teacher)]))
    if args.with_nokd:
        for (number, arch), path in zip(StudentTrain.STUDENTS.items(), students):
            stages.append((f"student {number} ({arch}) without KD", StudentTrain.main,
                           path.with_name(f"{path.stem}_nokd.pt"), train + ["--model", number, "--no-kd"]))
    stages.append(("selector", trainSelector.main, selector,
                   train + preset["selector"] + ["--students", *map(str, students)]))

    wall = {}
    for name, stage_main, path, stage_args in stages:
        state = "missing" if args.force else stage_state(path)
        if state == "complete":
            print(f"== {name}: {path} is complete, skipped (--force reruns it)")
            continue
        print(f"== {name} -> {path}" + (" (resuming)" if state == "partial" else ""))
        start = time.time()
        stage_main(stage_args + ["--checkpoint", str(path)] + (["--resume"] if state == "partial" else []))
        wall[name] = time.time() - start
        if stage_state(path) != "complete":
            print(f"{name} stopped before its last epoch; run the same command again to continue")
            return report(wall)

    start = time.time()
    inference.main(common + ["--teacher", str(teacher), "--students", *map(str, students),
                             "--selector", str(selector), "--out", str(results_dir)])
    wall["inference"] = time.time() - start
    report(wall)


def report(wall):
    print("\nwall time per stage (this invocation):")
    for name, seconds in wall.items():
        print(f"  {name:<36} {seconds / 60:7.2f} min")
    print(f"  {'total':<36} {sum(wall.values()) / 60:7.2f} min")


if __name__ == "__main__":
    run(main)
