"""tools/gpu-run.sh, dry-run on the CPU: what a lent GPU's one command hands back fits what comes back."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO, write_tree
from tests.test_published import BESIDE
from utils.bundle import MAX_FILE_BYTES, MAX_FILES, bundle_sizes
from utils.published import published_paths

SCRIPT = REPO / "tools" / "gpu-run.sh"


def job_env(**variables):
    """The environment of a job whose ``python`` is the interpreter running these tests, its virtual environment
    activated or not."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **variables}


@pytest.mark.slow
def test_the_pipeline_hands_back_its_bundle_log_and_weights_within_the_limits(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = job_env(OUT=str(out), PRESET="smoke", MSKD_GIT_COMMIT="dry-run",
                  DATA=str(write_tree(tmp_path / "cifar", per_class=(25, 5))))
    done = subprocess.run([str(SCRIPT), "pipeline", "3", "--device", "cpu", "--partial-data"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and all((out / f).stat().st_size <= MAX_FILE_BYTES for f in files)
    assert {"bundle.tar", "manifest.json"} < set(files) and "spec_selector.pt.gz" in files
    with tarfile.open(out / "bundle.tar") as tar:
        names = tar.getnames()
        log = tar.extractfile("gpu-run/reproduce.log").read().decode()
        machine = tar.extractfile("gpu-run/machine.txt").read().decode()
        preflight = tar.extractfile("gpu-run/preflight.log").read().decode()
    assert {"gpu-run/results.md", "gpu-run/logits.npz"} < set(names) and not any("weights" in n for n in names)
    assert preflight.startswith(f"$ python {REPO}/reproduce.py --preset smoke --device cuda --name preflight --force")
    box = float(log.split(" --minutes ")[1].split()[0])
    assert log.startswith(f"$ python {REPO}/reproduce.py --preset smoke --minutes {box:.2f} ")
    assert "--with-specialists mcl --device cpu --partial-data\n" in log and preflight.count("--with-specialists mcl")
    assert 0 < box < 3 - 0.4 and f"the pipeline gets the {box:.2f} minutes left of 3" in done.stdout  # 25 s outside
    assert "\r" not in log and "exit code 0 after" in log
    assert "commit dry-run" in machine and "torch" in machine
    dest = tmp_path / "results" / "published" / "cpu-2026-12-03"
    subprocess.run([str(SCRIPT), "publish", str(out), str(dest)], check=True, capture_output=True, timeout=120)
    assert bundle_sizes(dest, besides=BESIDE)[1]  # within a published bundle's limits, its logs beside it
    assert list(published_paths(dest / "weights")) == ["student1", "student2", "selector"]  # both pairs: over 40 MiB
    assert json.loads((dest / "weights" / "manifest.json").read_text())["pair"] in ("generalists", "specialists")


def test_a_failed_preflight_hands_back_its_log_and_runs_nothing_longer(tmp_path):
    out = tmp_path / "out"  # made by the job: a lent machine's exists, a dry run's need not
    env = job_env(OUT=str(out), MSKD_GIT_COMMIT="dry-run")
    done = subprocess.run([str(SCRIPT), "pipeline", "9", "--kd-loss", "none"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and sorted(p.name for p in out.iterdir()) == ["preflight.log"]
    log = (out / "preflight.log").read_text()
    assert "--preset smoke --device cuda" in log and "argument --kd-loss: invalid choice" in log
    assert "exit code 2" in log and not (tmp_path / "results").exists()


def fake_reproduce(tmp_path, pipeline_exit=0, pipeline_does=":"):
    """The environment of a job whose ``python .../reproduce.py`` prints its flags and ends at once, the preflight
    with exit code 0, the pipeline with ``pipeline_exit`` after the shell command ``pipeline_does``."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "python").write_text(f'#!/bin/sh\ncase "$*" in *" --name preflight "*) exit 0;;\n'
                                  f'*/reproduce.py*) echo "reproduce $*"; {pipeline_does}; exit {pipeline_exit};;\n'
                                  'esac\n'
                                  f'exec {sys.executable} "$@"\n')
    (shims / "python").chmod(0o755)
    (tmp_path / "out").mkdir()
    return {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
            "MSKD_GIT_COMMIT": "dry-run", "TMPDIR": str(own_tmpdir(tmp_path))}


def own_tmpdir(tmp_path):
    """A TMPDIR of the job's own: its working folders (mktemp's tmp.*) must be gone from it when the job ends."""
    folder = tmp_path / "tmpdir"
    folder.mkdir(exist_ok=True)
    return folder


def test_a_bundles_epochs_replace_the_time_box_and_the_specialists_can_be_left_out(tmp_path):
    env = {**fake_reproduce(tmp_path), "SPECIALISTS": ""}
    (tmp_path / "out").rmdir()  # made by the job: a dry run's need not exist
    done = subprocess.run([str(SCRIPT), "pipeline", "3", "--with-nokd", "--epochs-from", "results/published/run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "the pipeline runs the epochs of results/published/run, stopped if not done in" in done.stdout
    with tarfile.open(tmp_path / "out" / "bundle.tar") as tar:
        preflight = tar.extractfile("gpu-run/preflight.log").read().decode().splitlines()[0]
        log = tar.extractfile("gpu-run/reproduce.log").read().decode().splitlines()[0]
    assert preflight.endswith("--with-nokd") and "--epochs-from" not in preflight  # the smoke preset's one epoch
    assert log.startswith(f"$ python {REPO}/reproduce.py --preset full --epochs-from results/published/run ")
    assert " --name gpu-run " in log  # its own experiment: a dry run beside the quick start's smoke one works
    assert log.endswith("--with-nokd") and "--minutes" not in log and "--with-specialists" not in log + preflight
    assert not list(own_tmpdir(tmp_path).glob("tmp.*"))


def test_a_failed_pipeline_hands_back_its_log_and_unfinished_bundle_with_its_exit_code(tmp_path):
    built = "mkdir -p results/gpu-run.unfinished/.weights.99.tmp && cd results/gpu-run.unfinished && echo x > a.md" \
            " && echo w > .weights.99.tmp/student1.pt.gz && echo r > .results.md.99.tmp"  # and writes killed outright
    env = fake_reproduce(tmp_path, pipeline_exit=124, pipeline_does=built)  # as timeout(1) ends one that overruns
    (tmp_path / "results").mkdir()
    done = subprocess.run([str(SCRIPT), "pipeline", "3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 124 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bundle.tar"]
    with tarfile.open(tmp_path / "out" / "bundle.tar") as tar:
        log = tar.extractfile("gpu-run/reproduce.log").read().decode().splitlines()
        assert tar.extractfile("gpu-run/a.md").read() == b"x\n"  # what the stopped pipeline had built
        assert not [name for name in tar.getnames() if ".tmp" in name]
    assert log[1].startswith("reproduce ") and log[-1].startswith("exit code 124 after ")
    assert not list(own_tmpdir(tmp_path).glob("tmp.*"))


def test_minutes_that_are_no_number_or_leave_the_pipeline_under_a_minute_are_refused(tmp_path):
    env = fake_reproduce(tmp_path)
    for minutes, says in [("9,4", "error: MINUTES is the job's length in minutes, such as 9.4; got '9,4'\n"),
                          ("1.2", " of the 1.2 minutes to the pipeline, under 1: give more\n")]:  # 25 s outside
        done = subprocess.run([str(SCRIPT), "pipeline", minutes], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.endswith(says), done.stderr
    assert not (tmp_path / "results").exists() and not any((tmp_path / "out").iterdir())


def test_publish_puts_the_handed_back_bundle_and_its_weights_together(tmp_path):
    from tests.test_weights import both_pairs

    files, work = tmp_path / "files", tmp_path / "work"
    weights = both_pairs(files, {"generalists": [0.9, 0.9], "spec:": [0.8, 0.8]})  # in files/, results.json beside it
    (work / "gpu-run").mkdir(parents=True)
    (tmp_path / "results.json").rename(work / "gpu-run" / "results.json")
    with tarfile.open(files / "bundle.tar", "w") as tar:
        tar.add(work / "gpu-run", "gpu-run")
    dest = tmp_path / "results" / "published" / "h200-2026-12-10"
    env = job_env(TMPDIR=str(own_tmpdir(tmp_path)))
    done = subprocess.run([str(SCRIPT), "publish", str(files), str(dest)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not list(own_tmpdir(tmp_path).glob("tmp.*"))
    assert sorted(p.name for p in (dest / "weights").iterdir()) == sorted([*weights, "manifest.json"])
    assert (dest / "results.json").is_file()  # both pairs kept: they fit beside the tracked tree
    again = subprocess.run([str(SCRIPT), "publish", str(files), str(dest)], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr == f"error: {dest} exists; choose another DEST, or remove it first\n"
    nothing = subprocess.run([str(SCRIPT), "publish", str(work), str(tmp_path / "elsewhere")], capture_output=True,
                             text=True)
    assert nothing.returncode == 2 and nothing.stderr == f"error: {work} holds no bundle.tar: give the folder that a " \
                                                          "pipeline job handed back\n"


def test_without_a_mode_it_prints_its_usage_and_refuses():
    done = subprocess.run([str(SCRIPT)], env={**os.environ, "OUT": "/nonexistent"}, capture_output=True, text=True)
    assert done.returncode == 2 and "tools/gpu-run.sh pipeline MINUTES" in done.stdout
