"""The pipeline of reproduce.py: which stages are complete, current, partial or stale; each stage run in turn
(within its share of a time box); then inference into the results bundle, and a summary over seeds.

A stage is a training script (its module), the checkpoints it writes and its flags; nothing here imports a
script: ``reproduce.py`` hands its stages in.
"""

import contextlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from utils.bundle import METRICS, WEIGHTS, handed_back
from utils.checkpoint import load_checkpoint
from utils.cli import UserError
from utils.report import write_json, write_results
from utils.runs import RunFiles, built_for, config_changes, continue_pipeline_command, continued_by, write_atomically
from utils.timebox import pipeline_share, weighted_minutes


def _peek(path):
    return load_checkpoint(path, hint="python reproduce.py --force")


def checkpoint_state(path, expected, fingerprint, time_boxed=False):
    """``(state, why)`` of one checkpoint against the flags ``expected`` of the run that should write it:
    'complete', 'partial' (resumable), 'stale' (trained otherwise) or 'missing'. ``time_boxed``: the run is to
    choose its epochs in a time box, so a time-boxed checkpoint's own choice stands."""
    files = RunFiles.of(path)
    if not files.best.exists() and not files.last.exists():
        return "missing", ""
    checkpoint = _peek(files.last if files.last.exists() else files.best)
    changed = config_changes(checkpoint["config"], vars(expected))
    if time_boxed and checkpoint["config"].get("minutes") is not None:
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
    if files.best.exists() and _peek(files.best).get("complete"):
        return "complete", ""
    return ("partial", "") if files.last.exists() else ("missing", "")  # no resume state: it starts again


def stage_state(stage, fingerprint, time_boxed=False):
    """``(state, why)`` of a stage: that of its checkpoints when they agree; a mix with none complete is
    'missing' (it starts again), a mix of complete and other ones 'stale' (its loop cannot train some of them
    alone). ``time_boxed``: it is to run with --minutes."""
    try:
        expected = stage.module.runs(stage.module.parse_args(stage.argv))
    except UserError as e:  # what the stage reads (the selector's students) is not there
        if any(RunFiles.of(path).last.exists() or Path(path).exists() for path in stage.paths):
            return "stale", str(e)
        return "missing", ""
    states = {path: checkpoint_state(path, expected[str(path)], fingerprint, time_boxed) for path in stage.paths}
    stale = [(path, why) for path, (state, why) in states.items() if state == "stale"]
    if stale:
        path, why = stale[0]
        return "stale", why if len(stage.paths) == 1 else f"{path} {why}"
    kinds = {state for state, _ in states.values()}
    if len(kinds) > 1 and "complete" in kinds:
        return "stale", ", ".join(f"{path} {state}" for path, (state, _) in states.items())
    return ("missing" if len(kinds) > 1 else kinds.pop()), ""


def run_pipeline(args, name, plan, common, shares, finish, fingerprint, out, started=None):
    """Train every stage of ``plan`` that needs it, then run inference into the results bundle ``out`` and publish
    the students' and the selector's weights in it (``finish``: the ``main`` of inference.py and of publish.py,
    given the flags ``common``; the teacher's too with ``args.with_teacher_weights``), all built beside ``out``
    (``unfinished``) and moved there once complete; returns the stage wall times. ``shares``: each stage's share
    of a time box (``--minutes``) when it starts, of the time left among the stages still to run.

    A stage stopped early (a signal, --time-budget) ends the process with its exit code, after the wall times.
    """
    started = started or time.time()
    deadline = started + 60 * args.minutes if args.minutes else None

    first = next((k for k, stage in enumerate(plan) if stage.step == args.retrain_from),
                 0 if args.force else len(plan))
    retrained = {stage.title for stage in plan[first:]}

    def state_of(stage):
        state, why = ("missing", "") if stage.title in retrained else stage_state(stage, fingerprint, bool(deadline))
        if state == "stale":
            raise UserError(f"the {stage.title} stage of experiment '{name}' is stale ({why}); nothing was deleted: "
                            f"retrain it and the stages after it with --retrain-from {stage.step}, or write this run "
                            "elsewhere with --name")
        return state

    states = {stage.title: state_of(stage) for stage in plan}  # a stale stage stops the pipeline before any work
    to_run = [stage.title for stage in plan if states[stage.title] != "complete"]
    if deadline:
        print(f"time box of {args.minutes:g} min, shared when each stage starts: " + ", ".join(
            f"{t} {100 * shares[t]:.0f}%" for t in [*to_run, "inference"]))
    wall = {}
    for stage in plan:
        state = state_of(stage) if wall else states[stage.title]  # what the stages before it trained may change it
        if state == "complete":
            print(f"== {stage.title}: {', '.join(map(str, stage.paths))} complete, skipped (--force retrains it)")
            continue
        flags = {"partial": ["--resume"]}.get(state, ["--force"] if stage.title in retrained or _leftovers(stage)
                                               else [])
        share = None
        if deadline:
            minutes = weighted_minutes(deadline, shares, stage.title, [*to_run, "inference"])
            flags += ["--minutes", f"{minutes:.4f}"]
            share = (f"the {stage.title} stage's share of --minutes {args.minutes:g} ({minutes:.3g} min)",
                     minutes / args.minutes, "python reproduce.py")
        to_run.remove(stage.title)
        wall[stage.title] = run_stage(stage, state, flags, continue_pipeline_command(args.command), wall, share)
    inference_main, publish_main = finish
    staged = unfinished(out)
    shutil.rmtree(staged, ignore_errors=True)  # a stopped run's: built again from the checkpoints
    # a stop in them advises this pipeline again; what they print and record names out, not staged
    with continued_by(continue_pipeline_command(args.command)), built_for(staged, out):
        start = time.time()
        inference_main([*common, "--out", str(staged)])
        wall["inference"] = time.time() - start
        start = time.time()
        publish_main([*common, "--out", str(staged / WEIGHTS), "--force",
                      *(["--with-teacher"] if args.with_teacher_weights else [])])
        wall["published weights"] = time.time() - start
    finish_bundle(staged, out, plan, wall, args, time.time() - started)
    print_wall(wall)
    return wall


def unfinished(out):
    """Where the bundle ``out`` is built, to take its place once complete: a stop leaves ``out`` empty, so the
    command that goes on can write it."""
    out = Path(out)
    out = out.resolve() if out.name in ("", "..") else out  # "." and ".." have no name to add to
    return out.with_name(out.name + ".unfinished")


def run_stage(stage, state, flags, command, wall, share=None):
    """Run one stage's script with ``flags``; returns its wall time. A stop before its end prints the wall times
    so far (``wall``) and the command that goes on (``command``), then ends the process. ``share``: the stage's
    part of the pipeline's time box, for ``utils.timebox.pipeline_share``."""
    print(f"== {stage.title} -> {', '.join(map(str, stage.paths))}" + (" (resuming)" if state == "partial" else ""))
    start = time.time()
    try:
        with continued_by(command), pipeline_share(*share) if share else contextlib.nullcontext():
            stage.module.main([*stage.argv, *flags])
    except SystemExit:
        wall[stage.title] = time.time() - start
        print_wall(wall)
        print(f"stopped in the {stage.title} stage; continue with: {command}")
        raise
    return time.time() - start


def _leftovers(stage):
    """Whether a missing stage left files that a fresh run must replace (an unresumable start)."""
    return any(path.exists() for p in stage.paths for path in RunFiles.of(p))


def finish_bundle(staged, out, plan, wall, args, total_seconds):
    """Add to the bundle built in ``staged`` every stage's training log (``metrics.jsonl``) and the pipeline's wall
    times, then put it in ``out``'s place (missing or empty)."""
    lines = [json.dumps({"run": str(path), **record}) + "\n" for stage in plan for path in stage.paths
             for record in training_log(RunFiles.of(path).log, stage)]
    write_atomically(staged / METRICS, lambda tmp: tmp.write_text("".join(lines)))
    results = json.loads((staged / "results.json").read_text())
    results["pipeline"] = {"command": args.command, "minutes": args.minutes, "stages": wall,
                           "total_seconds": total_seconds}
    write_results(results, staged)
    try:
        if out.exists():
            out.rmdir()
        os.replace(staged, out)
    except OSError as e:
        raise UserError(f"could not move the bundle to {out} ({e.strerror or e}); it is complete in {staged}/") \
            from None
    files, within = handed_back(out)
    if not within:
        print(f"warning: the bundle {out} and its weights are more than a GPU job can hand back (8 files, each at "
              "most 16 MiB, 64 MiB in all): " + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in files))
    print(f"the results bundle of this run: {out}/")


def training_log(log, stage):
    """The records of a run's ``metrics.jsonl`` (none where it has none), refused in one line where damaged."""
    if not log.exists():
        return []
    try:
        return [json.loads(line) for line in log.read_text().splitlines()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{log} is damaged ({e}); the bundle's training logs need it: retrain the {stage.title} "
                        f"stage with --retrain-from {stage.step}") from None


def print_wall(wall):
    """Each stage's wall time, and their total."""
    print("\nwall time per stage (this invocation):")
    for name, seconds in wall.items():
        print(f"  {name:<36} {seconds / 60:7.2f} min")
    print(f"  {'total':<36} {sum(wall.values()) / 60:7.2f} min")


def summarise(out, bundles):
    """``out/seeds.md`` and ``.json``: each system's test accuracy and each KD gain, their mean and standard
    deviation over the seeds' bundles (``{seed: folder}``) that have the row, keyed by identifier, with the label
    each is shown by; a row's ``values`` follow ``seeds``, None where a seed's bundle has no such row."""
    seeds = list(bundles)
    rows = {}
    for seed, folder in bundles.items():
        results = json.loads((folder / "results.json").read_text())
        names = results.get("labels", {}).get("systems", {})
        for k, acc in results["accuracy"].items():
            rows.setdefault(k, {"label": names.get(k, k), "values": {}})["values"][seed] = 100 * acc
        for arch, gain in results.get("kd_gain", {}).items():
            rows.setdefault(f"kd_gain:{arch}", {"label": f"KD gain: {arch}", "values": {}})["values"][seed] = \
                100 * gain["difference"]
    summary = {}
    for k, row in rows.items():
        present = list(row["values"].values())
        summary[k] = {"label": row["label"], "mean": statistics.mean(present),
                      "std": statistics.stdev(present) if len(present) > 1 else 0.0,
                      "values": [row["values"].get(seed) for seed in seeds]}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "seeds.json", {"seeds": seeds, "rows": summary})
    lines = [f"# Results over seeds {', '.join(map(str, seeds))}", "",
             "Test accuracy in %, mean ± sample standard deviation over the seeds (one full pipeline per seed); "
             "a row some seed's bundle lacks (—) is over the others.", "",
             "| Row | Mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds),
             *[f"| {s['label']} | {s['mean']:.2f} ± {s['std']:.2f} | "
               + " | ".join("—" if v is None else f"{v:.2f}" for v in s["values"]) + " |" for s in summary.values()],
             ""]
    write_atomically(out / "seeds.md", lambda tmp: tmp.write_text("\n".join(lines)))
    print("\n".join(lines))
    print(f"wrote {out / 'seeds.md'} and {out / 'seeds.json'}")
