"""Trained networks turned into published weights (``utils/weights.py``), each measured on its hold-out and test
splits in the published precision: its weights rounded to bfloat16, then run in float32 on a CPU or under the
project's bf16 autocast on CUDA, through the same ``Network`` path as every evaluation."""

import re

from utils.checkpoint import weights_fingerprint
from utils.data import make_splits
from utils.networks import Network
from utils.provenance import provenance
from utils.published import FORMAT, PAIRS, SUFFIX
from utils.routed import Ladder, fit_policy
from utils.runtime import device_name
from utils.weights import PRECISION, check_sizes, pack, published_record, rounded, sha256, upcast, write_folder

SELECTOR_ACCURACY = "selector routing, at the threshold of best hold-out accuracy"
SELECTORS = {selector: prefix for prefix, selector in PAIRS.values()}  # what each selector's students' ids begin with


def file_name(k, arch):
    """``student1-densenet121.pt.gz``, ``selector.pt.gz``: the file of network ``k`` (``teacher``, ``student1``...,
    ``selector``, ``spec1``..., ``spec_selector``)."""
    return f"{k}{SUFFIX}" if k in SELECTORS else f"{k}-{arch}{SUFFIX}"


def as_published(network):
    """``network`` (a ``Network``) with its weights as they are published: rounded, then upcast to float32."""
    model = upcast(rounded(network.checkpoint["model"]))
    checkpoint = {**network.checkpoint, "model": model, "weights_sha256": weights_fingerprint(model)}
    return Network(network.path, None, "", network.runtime, role=network.role, checkpoint=checkpoint)


def routed_students(published, selector):
    """The ids of the students the selector ``selector`` (an id of ``SELECTORS``) routes, in order."""
    return [k for k in published if re.fullmatch(SELECTORS[selector] + r"\d+", k)]


def accuracies(published):
    """``{id: {"holdout", "test"}}``: each classifier's accuracy, and each selector's routed accuracy
    (``SELECTOR_ACCURACY``), from their logits."""
    result = {k: {split: (net.logits[split][0].argmax(1) == net.logits[split][1]).double().mean().item()
                  for split in ("holdout", "test")}
              for k, net in published.items() if k not in SELECTORS}
    for selector in SELECTORS.keys() & published.keys():
        ladder = Ladder([published[k] for k in routed_students(published, selector)], published[selector])
        router = fit_policy("selector", ladder)
        result[selector] = {split: router.route(outputs).accuracy(labels)
                            for split, (outputs, labels) in ((s, ladder.outputs(s)) for s in ("holdout", "test"))}
    return result


def relinked(k, checkpoint, published, names, sources):
    """Its record's links to other networks made those to their published files: a selector's students, and a
    student's teacher where that teacher is published too (``sources``: each one's checkpoint)."""
    def link(key):
        return {"path": names[key], "arch": published[key].arch,
                "weights_sha256": published[key].checkpoint["weights_sha256"]}

    if k in SELECTORS:
        return {**checkpoint, "students": [link(s) for s in routed_students(published, k)]}
    teacher = checkpoint.get("teacher")
    if "teacher" in published and teacher and teacher["weights_sha256"] == sources["teacher"]["weights_sha256"]:
        return {**checkpoint, "teacher": link("teacher")}
    return checkpoint


def export_weights(networks, data, out, command, force=False, batch_size=1024):
    """Publish ``networks`` (``{id: Network}``: optionally ``teacher``, then ``student1``... and ``selector``, and a
    method's specialists ``spec1``... and ``spec_selector``, of one split, each selector checked to be its
    students') into the folder ``out``, each measured on ``data``; returns
    the manifest. An existing folder is replaced only with ``force``."""
    published = {k: as_published(net) for k, net in networks.items()}
    sources = {k: {"path": net.path, "weights_sha256": net.checkpoint["weights_sha256"]} for k, net in networks.items()}
    splits = make_splits(data, published["selector"].split)
    for net in published.values():
        net.logits = net.compute_logits(splits, batch_size)
    names = {k: file_name(k, net.arch) for k, net in published.items()}
    files = {}
    for k, net in published.items():
        record = published_record(relinked(k, net.checkpoint, published, names, sources), *net.logits["holdout"],
                                  sources[k])
        files[names[k]] = pack(record)
    check_sizes(files, allowed=[names["teacher"]] if "teacher" in names else [])
    manifest = make_manifest(published, names, files, sources, accuracies(published), data, command)
    write_folder(out, files, manifest, force)
    return manifest


def make_manifest(published, names, files, sources, accuracy, data, command):
    """``manifest.json``: what every file is, its sha256, and each network's accuracy measured as published."""
    runtime = published["selector"].runtime
    first = published["selector"].checkpoint
    entries = {}
    for k, net in published.items():
        c = net.checkpoint
        entries[k] = {
            "file": names[k], "bytes": len(files[names[k]]), "sha256": sha256(files[names[k]]), "kind": c["kind"],
            "arch": c["arch"], "num_classes": c["num_classes"], "model_args": c.get("model_args", {}),
            "tta": net.tta, "params": net.stats["params"], "gflops": net.gflops,
            "weights_sha256": c["weights_sha256"], "accuracy": accuracy[k],
            **({"accuracy_of": SELECTOR_ACCURACY} if k in SELECTORS else {}),
            **({"specialist": c["specialist"]} if c.get("specialist") else {}),
            "trained": {**sources[k], "epochs": c.get("epochs"),
                        "holdout_acc": c.get("holdout_acc"), "test_acc": c.get("test_acc"),
                        "provenance": c.get("provenance", {})}}
    arithmetic = "bfloat16 autocast (CUDA)" if runtime.cuda else "float32"
    return {"format": FORMAT, "precision": str(PRECISION).removeprefix("torch."), "split": first["split"],
            "data_fingerprint": first["data_fingerprint"], "classes": list(data.classes),
            "measured": {"data_fingerprint": data.fingerprint, "device": device_name(runtime.device),
                         "arithmetic": arithmetic, "images": {s: len(published["selector"].logits[s][1])
                                                              for s in ("holdout", "test")}},
            "command": command, "provenance": provenance(runtime.device), "networks": entries}
