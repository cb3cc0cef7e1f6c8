"""A results bundle: every figure of a run and every network's logits, small enough to keep in git.

``inference.py`` writes, in its output folder, ``results.md``, ``results.json`` (every figure and
each network's checkpoint record), the plots and ``logits.npz`` (every network's hold-out and test
logits, the labels); ``reproduce.py`` adds ``metrics.jsonl`` (every stage's training log) and its
stage wall times. ``inference.py --bundle`` redoes every routing policy, comparison, table and plot
from such a folder alone, on a CPU, without checkpoints or data.

Logits are kept in float32: the re-analysis then gives exactly the figures of the run that wrote
the bundle (float16 would change a few argmaxes, temperatures and thresholds), and a whole
pipeline's logits take a few MB.
"""

import json
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from utils.cli import UserError
from utils.runs import write_atomically
from utils.trained import Networks, Trained, check_out_of_fold, check_selector_students

LOGITS = "logits.npz"
METRICS = "metrics.jsonl"
MAX_FILES, MAX_FILE_BYTES, MAX_BYTES = 8, 16 * 2**20, 64 * 2**20  # what a bundle may hold, to be kept in git
WEIGHTS = "weights"  # the published weights beside a bundle (utils/weights.py), in this folder of it


def write_logits(networks, path):
    """``logits.npz``: the labels of both splits once, and each network's logits under its position in
    ``results["networks"]`` (``holdout_0``, ``test_0``, ...)."""
    networks = list(networks)
    arrays = {f"{split}_labels": networks[0].logits[split][1].numpy() for split in ("holdout", "test")}
    for k, net in enumerate(networks):
        for split in ("holdout", "test"):
            logits, labels = net.logits[split]
            if not torch.equal(labels, networks[0].logits[split][1]):
                raise UserError(f"{net.path} was evaluated on other {split} images than {networks[0].path}; "
                                "every network of a bundle must share the split")
            arrays[f"{split}_{k}"] = logits.float().numpy()

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    write_atomically(path, write)


def check_bundle_folder(folder):
    """``folder`` as a Path, refused in one line where it lacks a bundle's files."""
    folder = Path(folder)
    if not (folder / "results.json").is_file() or not (folder / LOGITS).is_file():
        raise UserError(f"{folder} is not a results bundle (it needs results.json and {LOGITS}, as "
                        "reproduce.py or inference.py write them)")
    return folder


def read_bundle(folder):
    """``(results, [Trained])`` of a bundle folder, each network with its logits; refused in one line, naming the file
    and what is wrong, when the folder is not a bundle, a file is damaged or its numbers do not fit (missing keys,
    labels outside the classes, logits of another shape, integer or non-finite logits)."""
    folder = check_bundle_folder(folder)
    results_path, logits_path = folder / "results.json", folder / LOGITS
    results = _results(results_path)
    records = results["networks"]
    arrays = _arrays(logits_path)
    classes = records[results["layout"]["teacher"]]["checkpoint"]["num_classes"]
    labels = {split: _labels(arrays, split, classes, logits_path) for split in ("holdout", "test")}
    if len(labels["test"]) != results["test_images"] or results["split"] != records[0]["checkpoint"]["split"]:
        raise UserError(f"{folder}: {LOGITS} does not hold the split results.json describes (another run's?)")
    logits = [{split: (_logits(arrays, split, k, record, len(labels[split]), logits_path), labels[split])
               for split in labels} for k, record in enumerate(records)]
    if "costs" in results:
        results["costs"] = cost_ids(results["costs"])
    return results, [Trained.from_record(record, network_logits) for record, network_logits in zip(records, logits)]


RECORD = {"role": str, "path": str, "flops": (int, float), "checkpoint": dict}
CHECKPOINT = {"kind": str, "arch": str, "num_classes": int, "split": dict, "epoch": int, "epochs": int}
LAYOUT = {"teacher": int, "students": list, "twins": list, "selector": int}


def _results(path):
    """``results.json`` as a dict holding what a re-analysis reads, of the types it reads."""
    try:
        results = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is not readable JSON ({e}); write the bundle again with inference.py") from None

    def require(value, keys, where):
        for key, kind in keys.items():
            if not isinstance(value, dict) or not isinstance(value.get(key), kind) or isinstance(value.get(key), bool):
                raise UserError(f"{path}: {where} lacks {key!r} (or it is not a {getattr(kind, '__name__', kind)}); "
                                "the bundle is incomplete or comes from another version: write it again with "
                                "inference.py")

    require(results, {"networks": list, "layout": dict, "test_images": int, "split": dict}, "the bundle")
    for k, record in enumerate(results["networks"]):
        require(record, RECORD, f"network {k}")
        require(record["checkpoint"], CHECKPOINT, f"the checkpoint record of network {k}")
    require(results["layout"], LAYOUT, "the layout of the networks")
    layout = results["layout"]
    roles = [layout[role] for role in ("teacher", "selector", "control", "spec_selector", "spec_control")
             if layout.get(role) is not None] + layout["students"] + layout["twins"] + layout.get("specialists", [])
    if not results["networks"] or not all(isinstance(k, int) and 0 <= k < len(results["networks"]) for k in roles):
        raise UserError(f"{path}: its layout names networks it does not hold; write the bundle again with "
                        "inference.py")
    return results


def _arrays(path):
    """Every array of ``logits.npz``, read."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is truncated or damaged ({type(e).__name__}); write the bundle again with "
                        "inference.py") from None


def _array(arrays, name, path):
    if name not in arrays:
        raise UserError(f"{path} lacks {name!r}; the bundle is incomplete or comes from another run: write it again "
                        "with inference.py from that run's checkpoints")
    return arrays[name]


def _labels(arrays, split, classes, path):
    labels = _array(arrays, f"{split}_labels", path)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: {split}_labels is not a list of class indices ({labels.dtype}, shape "
                        f"{labels.shape})")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise UserError(f"{path}: {split}_labels holds labels outside the {classes} classes "
                        f"({labels.min()} to {labels.max()})")
    return torch.from_numpy(labels.astype(np.int64))


def _logits(arrays, split, k, record, images, path):
    """Network ``k``'s logits on a split: float, one row per image, one column per output, finite."""
    logits = _array(arrays, f"{split}_{k}", path)
    outputs = record["checkpoint"]["num_classes"]
    name = f"the {split} logits of {record['path']} ({split}_{k})"
    if not np.issubdtype(logits.dtype, np.floating):
        raise UserError(f"{path}: {name} are {logits.dtype}, not floating-point numbers")
    if logits.shape != (images, outputs):
        raise UserError(f"{path}: {name} have shape {logits.shape}, not {images} images x {outputs} outputs")
    if not np.isfinite(logits).all():
        raise UserError(f"{path}: {name} hold NaN or Inf")
    return torch.from_numpy(logits.astype(np.float32, copy=False))


def networks_of_bundle(folder):
    """``(results, Networks)`` of a bundle: each network's record and logits, no weights."""
    results, networks = read_bundle(folder)
    networks = Networks.from_layout(networks, results["layout"])
    for students, selectors in ((networks.students, (networks.selector, networks.control)),
                                (networks.specialists, (networks.spec_selector, networks.spec_control))):
        for selector in filter(None, selectors):
            check_selector_students(selector.checkpoint, selector.path, students)
            check_out_of_fold(selector.checkpoint, selector.path)
    return results, networks


def bundle_sizes(folder, besides=()):
    """``[(file name, bytes)]`` of a bundle folder (its published weights aside, ``handed_back`` counts them), and
    whether it is within the limits of one kept in git; ``besides``: names of files kept beside the bundle, not
    counted."""
    files = sorted((p.name, p.stat().st_size) for p in Path(folder).iterdir() if p.is_file() and p.name not in besides)
    return files, within_limits(files)


def within_limits(files):
    """Whether ``[(name, bytes)]`` fit ``MAX_FILES`` files, each at most ``MAX_FILE_BYTES``, ``MAX_BYTES`` in all."""
    return (len(files) <= MAX_FILES and all(size <= MAX_FILE_BYTES for _, size in files)
            and sum(size for _, size in files) <= MAX_BYTES)


class _Counter:
    """A file that only counts the bytes written to it."""

    def __init__(self):
        self.bytes = 0

    def write(self, data):
        self.bytes += len(data)
        return len(data)

    def tell(self):
        return self.bytes


def handed_back(folder):
    """``([(name, bytes)], within_limits)`` of a bundle folder as a GPU job hands it back: the bundle without its
    ``weights/`` as one tar file (``bundle.tar``, its size as ``tarfile`` writes it), and each file of ``weights/``
    on its own."""
    folder = Path(folder)
    counter = _Counter()
    with tarfile.open(fileobj=counter, mode="w") as tar:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            tar.add(path, arcname=f"{folder.name}/{path.name}")
    weights = sorted(p for p in (folder / WEIGHTS).glob("*") if p.is_file()) if (folder / WEIGHTS).is_dir() else []
    files = [("bundle.tar", counter.bytes), *((f"{WEIGHTS}/{p.name}", p.stat().st_size) for p in weights)]
    return files, within_limits(files)


def cost_ids(costs):
    """A bundle's measured costs keyed by identifiers (``utils.analyses``): bundles written before results were
    keyed by identifiers name them by their display text (``student 1``, ``routed (cascade)``, ...)."""
    ids = {}
    for name, cost in costs.items():
        routed = re.fullmatch(r"routed \((\w+)\)", name)
        student = re.fullmatch(r"student (\d+)", name)
        if routed:
            name, cost = "routed", {**cost, "router": routed.group(1)}
        elif student:
            name = f"student{student.group(1)}"
        elif name == "both students" or re.fullmatch(r"all \d+ students", name):
            name = "students"
        ids[{"selector routing": "selector", "cascade to the teacher": "to_teacher"}.get(name, name)] = cost
    return ids
