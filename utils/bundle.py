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
from pathlib import Path

import numpy as np
import torch

from utils.cli import UserError
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
    np.savez_compressed(path, **arrays)


def read_bundle(folder):
    """``(results, [Trained])`` of a bundle folder, each network with its logits; refused in one line when the
    folder is not a bundle or its logits do not fit its results."""
    folder = Path(folder)
    results_path, logits_path = folder / "results.json", folder / LOGITS
    if not results_path.is_file() or not logits_path.is_file():
        raise UserError(f"{folder} is not a results bundle (it needs results.json and {LOGITS}, as "
                        "reproduce.py or inference.py write them)")
    try:
        results = json.loads(results_path.read_text())
        records = results["networks"]
        with np.load(logits_path, allow_pickle=False) as arrays:
            labels = {split: torch.from_numpy(arrays[f"{split}_labels"]) for split in ("holdout", "test")}
            logits = [{split: (torch.from_numpy(arrays[f"{split}_{k}"]), labels[split]) for split in labels}
                      for k in range(len(records))]
    except KeyError as e:
        raise UserError(f"{folder}: {LOGITS} or results.json lacks {e}; the bundle is incomplete or comes from "
                        "another run: write it again with inference.py from that run's checkpoints") from None
    except (ValueError, OSError) as e:
        raise UserError(f"{folder}: cannot read the bundle ({e})") from None
    if len(labels["test"]) != results["test_images"] or results["split"] != records[0]["checkpoint"]["split"]:
        raise UserError(f"{folder}: {LOGITS} does not hold the split results.json describes (another run's?)")
    for k, (record, network_logits) in enumerate(zip(records, logits)):
        for split, (split_logits, split_labels) in network_logits.items():
            if len(split_logits) != len(split_labels):
                raise UserError(f"{folder}: the {split} logits of {record['path']} do not match the labels")
    if "costs" in results:
        results["costs"] = cost_ids(results["costs"])
    return results, [Trained.from_record(record, network_logits) for record, network_logits in zip(records, logits)]


def networks_of_bundle(folder):
    """``(results, Networks)`` of a bundle: each network's record and logits, no weights."""
    results, networks = read_bundle(folder)
    networks = Networks.from_layout(networks, results["layout"])
    for selector in [networks.selector, *([networks.control] if networks.control else [])]:
        check_selector_students(selector.checkpoint, selector.path, networks.students)
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
