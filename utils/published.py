"""Where published weights live and what a published folder lists; plain Python, so that a script resolves its
default weights (predict.py's) before torch is imported.

A published folder (``utils/weights.py`` has its format) is ``<bundle>/weights/``: ``manifest.json`` and one
``<id>-<arch>.pt.gz`` per network. The repository keeps one, the newest GPU run's, in
``results/published/<gpu>-<yyyy-mm-dd>/weights/``.
"""

import json
import re
from pathlib import Path

from utils.cli import UserError
from utils.runs import RESULTS_ROOT

FORMAT = "mskd-weights/1"
MANIFEST = "manifest.json"
SUFFIX = ".pt.gz"
PUBLISHED_ROOT = RESULTS_ROOT / "published"
PAIRS = {"generalists": ("student", "selector"), "specialists": ("spec", "spec_selector")}  # ids' prefix, selector
FIX = "restore the folder as it was published (`git checkout -- FOLDER`), or write it again with `python publish.py`"


def refuse_existing(out, force):
    """Refuse to replace the published folder ``out`` without ``force``, and any other folder or file even with it:
    ``--force`` replaces what publish.py wrote, nothing else."""
    out = Path(out)
    if not out.exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name != MANIFEST and not is_published_file(p)) \
        if out.is_dir() else None
    if foreign != []:
        held = f"holds {foreign[0]}, which is not published weights" if foreign else "is a file"
        raise UserError(f"{out} {held}; publish.py replaces only a folder of published weights, even with --force: "
                        "choose another --out")
    if any(out.iterdir()) and not force:
        raise UserError(f"{out} already holds published weights; add --force to replace them, or choose another "
                        "--out")


def is_published_file(path):
    """Whether ``path`` names a published weights file (``.pt.gz``), whatever is beside it."""
    return str(path).endswith(SUFFIX)


def stem(path):
    """``student1-densenet121`` of a published file, ``student_googlenet`` of a checkpoint."""
    name = Path(path).name
    return name.removesuffix(SUFFIX) if is_published_file(name) else name.removesuffix(".pt")


def read_manifest(folder):
    """The manifest of a published folder, refused in one line where there is none or it is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        inner = Path(folder) / "weights"
        advice = (FIX.replace("FOLDER", str(folder)) if any(Path(folder).glob(f"*{SUFFIX}")) else
                  f"give its weights folder, {inner}" if (inner / MANIFEST).is_file() else
                  f"give a folder that `python publish.py` writes, such as {PUBLISHED_ROOT}/<run>/weights")
        raise UserError(f"{folder} is not a published weights folder (no {MANIFEST}); {advice}")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} ({e}); {FIX.replace('FOLDER', str(folder))}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "networks" not in manifest:
        raise UserError(f"{path} is not a manifest of published weights ({FORMAT}); "
                        f"{FIX.replace('FOLDER', str(folder))}")
    return manifest


def published_paths(folder):
    """``{id: path}`` of the networks a published folder lists (``teacher``, ``student1``..., ``selector``), in the
    manifest's order; refused in one line where a listed file is missing."""
    paths = {}
    for k, entry in read_manifest(folder)["networks"].items():
        path = Path(folder) / entry["file"]
        if not path.is_file():
            raise UserError(f"{path} is missing (listed in {Path(folder) / MANIFEST}); "
                            f"{FIX.replace('FOLDER', str(folder))}")
        paths[k] = str(path)
    return paths


def student_paths(paths):
    """The students of ``published_paths``, in routing order."""
    return [path for k, path in paths.items() if k.startswith("student")]


def newest_published(root=PUBLISHED_ROOT):
    """The published weights folder of the newest run under ``root`` (by the date that ends its bundle's name,
    ``<gpu>-<yyyy-mm-dd>``), or None where there is none."""
    dated = []
    for manifest in Path(root).glob(f"*/weights/{MANIFEST}"):
        date = re.search(r"\d{4}-\d{2}-\d{2}$", manifest.parent.parent.name)
        if date:
            dated.append((date.group(), manifest.parent.parent.name, str(manifest.parent)))
    return max(dated)[2] if dated else None
