"""What produced a result: the code's commit, the versions and the device, recorded in every checkpoint and config."""

import json
import os
import platform
import subprocess
from pathlib import Path

import torch
import torchvision

from utils.runtime import device_name

REPO = Path(__file__).resolve().parents[1]


def git_commit():
    """The commit that ``MSKD_GIT_COMMIT`` names, where it is set (a copy of the tree, as a cluster job runs it,
    may hold no ``.git``, or another commit's); else the repository's, with ``-dirty`` if tracked files changed;
    else None."""
    outside = os.environ.get("MSKD_GIT_COMMIT") or None
    if outside:
        return outside
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(device):
    """What produced a result: versions, code and hardware."""
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "git_commit": git_commit(), "device": device_name(device)}


def write_config(path, flags, device, script, **extra):
    """``<stem>.config.json``: the command, every flag (a dict), versions, git commit and device, and ``extra``."""
    config = {"script": script, "command": flags.get("command"), "flags": flags, **provenance(device), **extra}
    Path(path).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return config
