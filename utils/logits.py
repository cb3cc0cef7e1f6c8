"""Trained networks and their logits on the hold-out and test splits, computed once and kept beside the checkpoint.

``<stem>.logits.pt`` is tied to the checkpoint's weights (their fingerprint), the data's
fingerprint and the split; when any of these changes it is computed again. Routing policies,
evaluation and the results table read these files, so comparing policies costs seconds on a CPU.
"""

from pathlib import Path

import torch

from models import model_stats
from utils.augment import TTA_VIEWS, predict
from utils.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from utils.data import make_splits
from utils.engine import prepare_model
from utils.routing import batched_logits

FORMAT = "mskd-logits/1"


def logits_path(checkpoint_path):
    path = Path(checkpoint_path)
    return path.with_name(f"{path.name.removesuffix('.pt')}.logits.pt")


def split_logits(checkpoint_path, checkpoint, model, data, runtime, batch_size=1024):
    """``{"holdout", "test"}`` -> ``(float32 logits (N, K), labels (N,))`` on the CPU, cached on disk.

    The split is the checkpoint's own (``checkpoint["split"]``); an empty hold-out gives empty tensors.
    ``data`` is the CIFAR-10 to evaluate on, or a function that loads it: then the cache is taken
    when it was made on the checkpoint's own training data, and the data is loaded only if it is not.
    """
    fingerprint = checkpoint["data_fingerprint"] if callable(data) else data.fingerprint
    key = {"format": FORMAT, "weights_sha256": checkpoint["weights_sha256"], "data_fingerprint": fingerprint,
           "split": dict(checkpoint["split"])}
    path = logits_path(checkpoint_path)
    if path.exists():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if all(cached.get(k) == v for k, v in key.items()):
                return {name: (cached[name], cached[f"{name}_labels"]) for name in ("holdout", "test")}
        except Exception:  # unreadable: computed again below
            pass
    data = data() if callable(data) else data
    key["data_fingerprint"] = data.fingerprint
    split = checkpoint["split"]
    splits = make_splits(data, split["holdout"], split["split_seed"], split["limit"])
    result = {}
    for name in ("holdout", "test"):
        images, labels = splits[name]
        logits = batched_logits(model, images, runtime, batch_size).cpu() if len(images) else \
            torch.zeros(0, checkpoint["num_classes"])
        result[name] = (logits, labels)
    if runtime.is_main:
        save_checkpoint(path, {**key, **{name: logits for name, (logits, _) in result.items()},
                               **{f"{name}_labels": labels for name, (_, labels) in result.items()}})
    return result


class Network:
    """A trained network, its checkpoint and its logits on the hold-out and test splits.

    Calling it runs the network with its checkpoint's ``--tta`` views; its GFLOPs count them.
    """

    def __init__(self, role, path, kind, hint, runtime, data):
        self.role, self.path = role, str(path)
        self.checkpoint = load_checkpoint(path, hint=hint, kind=kind)
        model = model_from_checkpoint(self.checkpoint, path, hint).eval().requires_grad_(False)
        self.model = prepare_model(model, runtime)
        self.tta = self.checkpoint.get("config", {}).get("tta", "none")
        self.stats = model_stats(self.model)
        self.gflops = self.stats["flops"] / 1e9 * TTA_VIEWS[self.tta]
        self.logits = split_logits(path, self.checkpoint, self, data, runtime)
        if not self.checkpoint.get("complete"):
            print(f"warning: {path} comes from an unfinished run ({self.checkpoint['epoch']}/"
                  f"{self.checkpoint['epochs']} epochs); its row is marked")

    def __call__(self, x):
        """Logits for a normalised batch, averaged over the test-time views the network was trained to use."""
        return predict(self.model, x, self.tta)

    @property
    def label(self):
        arch = self.checkpoint["arch"]
        kd = {True: " (KD)", False: " without KD"}.get(self.checkpoint.get("kd"), "")
        done = "" if self.checkpoint.get("complete") else \
            f" [unfinished: {self.checkpoint['epoch']}/{self.checkpoint['epochs']} epochs]"
        return f"{self.role} {arch}{kd}{done}"
