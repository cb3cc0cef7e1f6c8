"""tools/gpu-run.sh, dry-run on the CPU: what a lent GPU's one command hands back fits what comes back."""

import os
import subprocess
import tarfile

import pytest

from tests.conftest import REPO, write_tree
from utils.bundle import MAX_FILE_BYTES, MAX_FILES

SCRIPT = REPO / "tools" / "gpu-run.sh"


@pytest.mark.slow
def test_the_pipeline_hands_back_its_bundle_log_and_weights_within_the_limits(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "PRESET": "smoke", "MSKD_GIT_COMMIT": "dry-run",
           "DATA": str(write_tree(tmp_path / "cifar", per_class=(25, 5)))}
    done = subprocess.run([str(SCRIPT), "pipeline", "3", "--device", "cpu", "--partial-data"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and all((out / f).stat().st_size <= MAX_FILE_BYTES for f in files)
    assert {"bundle.tar", "manifest.json"} < set(files) and any(f.startswith("spec_selector-") for f in files)
    with tarfile.open(out / "bundle.tar") as tar:
        names = tar.getnames()
        log = tar.extractfile("gpu-run/reproduce.log").read().decode()
        machine = tar.extractfile("gpu-run/machine.txt").read().decode()
    assert {"gpu-run/results.md", "gpu-run/logits.npz"} < set(names) and not any("weights" in n for n in names)
    assert log.startswith(f"$ python {REPO}/reproduce.py --preset smoke --minutes 3 --with-specialists mcl")
    assert "\r" not in log and "exit code 0 after" in log
    assert "commit dry-run" in machine and "torch" in machine


def test_without_a_mode_it_prints_its_usage_and_refuses():
    done = subprocess.run([str(SCRIPT)], env={**os.environ, "OUT": "/nonexistent"}, capture_output=True, text=True)
    assert done.returncode == 2 and "tools/gpu-run.sh pipeline MINUTES" in done.stdout
