"""A trained network loaded from its checkpoint, and its logits on the hold-out and test splits, cached.

``Network`` is the one way a finished teacher, student or selector is used again: by a
student's knowledge distillation (the teacher), by the selector's labelling (the students), by
``evaluate.py``, ``inference.py`` and ``predict.py``. Called on a normalised batch it gives its
logits averaged over the test-time views it was trained to use (``--tta``), or those asked for; its GFLOPs
count them. It is a ``utils.trained.Trained`` with weights, from a checkpoint or from published weights
(``utils/weights.py``).

``<stem>.logits.pt`` beside the checkpoint holds its logits on the hold-out and test splits, tied
to the checkpoint's weights (their fingerprint), the data's fingerprint, the split and the test-time views
(``<stem>.tta-<views>.logits.pt`` for views other than its own); when any of
these changes it is computed again. Routing, evaluation and the results table read these, so
comparing policies costs seconds on a CPU. A checkpoint that carries ``holdout_logits`` gives those
as its hold-out logits instead of running its weights: the selector's out-of-fold scores, each
image's from a selector that never trained on it (``trainSelector.py``), since the hold-out split
is where routing is fitted and the shipped selector trained on all of it; and published weights, whose
hold-out logits were measured when they were published, so that routing is fitted on the same scores anywhere
and ``predict.py`` needs no data.

Where the checkpoint's folder cannot be written (a read-only copy), the cache goes to a per-user
folder instead, ``~/.cache/mskd-logits/`` (or ``$MSKD_LOGITS_CACHE``), named by the checkpoint's
absolute path and weights; published weights are always cached there, never in their folder. Where neither
can be written, the logits are not cached, with a note.
"""

import functools
import hashlib
import os
from pathlib import Path

import torch

from models import model_stats
from utils.augment import predict
from utils.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    weights_fingerprint,
)
from utils.cli import UserError
from utils.data import make_splits
from utils.published import is_published_file, stem
from utils.runtime import batched_logits, prepare_model
from utils.trained import Trained

FORMAT = "mskd-logits/2"


def logits_path(checkpoint_path, views=""):
    """``<stem>.logits.pt`` beside the checkpoint (``<stem>.tta-<views>.logits.pt`` for views other than its own)."""
    path = Path(checkpoint_path)
    return path.with_name(f"{stem(path)}{f'.tta-{views}' if views else ''}.logits.pt")


def user_logits_path(checkpoint_path, weights_sha256, views=""):
    """Where the logits of a checkpoint in a read-only folder (or of published weights) are cached: the per-user
    folder."""
    path = Path(checkpoint_path).resolve()
    key = hashlib.sha256(f"{path}\n{weights_sha256}\n{views}".encode()).hexdigest()[:16]
    folder = Path(os.environ.get("MSKD_LOGITS_CACHE") or Path.home() / ".cache" / "mskd-logits")
    return folder / f"{stem(path)}-{key}.logits.pt"


class Network(Trained):
    """A trained network on the device, in eval mode, with its checkpoint (``kind``: teacher, student,
    selector, or None for any); ``hint`` is the command that makes the checkpoint, for errors.
    Unfinished checkpoints are announced. ``tta``: test-time views other than those it was trained to use
    (``utils.augment.TTA_VIEWS``). ``checkpoint``: the checkpoint dict of ``path``, where it is loaded already.
    """

    def __init__(self, path, kind, hint, runtime, role="", tta=None, checkpoint=None):
        super().__init__(role, path, checkpoint or load_checkpoint(path, hint=hint, kind=kind))
        self.own_tta, self.tta = self.tta, tta or self.tta
        self.runtime = runtime
        model = model_from_checkpoint(self.checkpoint, path, hint).eval().requires_grad_(False)
        self.model = prepare_model(model, runtime)
        if not self.checkpoint.get("complete") and runtime.is_main:
            print(f"warning: {path} comes from an unfinished run ({self.progress} epochs); its results are marked")

    def __call__(self, x):
        """Logits for a normalised batch, averaged over its test-time views."""
        return predict(self.model, x, self.tta)

    @functools.cached_property
    def stats(self):
        """``{"params", "flops", "feature_map"}`` of one plain forward pass (``models.model_stats``)."""
        return model_stats(self.model)

    @property
    def carries_holdout(self):
        """Whether its checkpoint's own hold-out logits stand for its hold-out split: the selector's out-of-fold
        scores, published weights' (``utils/weights.py``), unless other test-time views are asked for."""
        return "holdout_logits" in self.checkpoint and self.tta == self.own_tta

    def cache_paths(self):
        """Where its logits are cached: beside the checkpoint, else in the per-user folder; never beside published
        weights (a folder kept in git, whose files the manifest lists)."""
        views = "" if self.tta == self.own_tta else self.tta
        user = user_logits_path(self.path, self.checkpoint["weights_sha256"], views)
        return (user,) if is_published_file(self.path) else (logits_path(self.path, views), user)

    def load_logits(self, data, batch_size=1024, holdout_only=False):
        """``{"holdout", "test"}`` -> ``(float32 logits (N, K), labels (N,))`` on the CPU, from the cache
        (``cache_paths``) or computed (and cached) on the checkpoint's own split.

        ``data`` is the CIFAR-10 to evaluate on, or a function that loads it: then the cache is taken
        when it was made on the checkpoint's own training data, and the data is loaded only if it is not.
        ``holdout_only``: only the hold-out split is wanted (routing's fit); a network that carries its hold-out
        logits and labels (published weights) then needs no data. An empty hold-out split gives empty tensors.
        """
        checkpoint = self.checkpoint
        self.__dict__.pop("temperature", None)  # fitted on the logits about to be loaded
        if holdout_only and self.carries_holdout and "holdout_labels" in checkpoint:
            labels = checkpoint["holdout_labels"]
            self.logits = {"holdout": (self.out_of_fold_logits(labels), labels)}
            return self.logits
        fingerprint = checkpoint["data_fingerprint"] if callable(data) else data.fingerprint
        key = {"format": FORMAT, "weights_sha256": checkpoint["weights_sha256"], "data_fingerprint": fingerprint,
               "split": self.split.as_dict(), "tta": self.tta}
        for path in self.cache_paths():
            self.logits = _read_cache(path, key)
            if self.logits is not None:
                if self.carries_holdout:
                    labels = self.logits["holdout"][1]
                    self.logits["holdout"] = (self.out_of_fold_logits(labels), labels)
                return self.logits
        data = data() if callable(data) else data
        key["data_fingerprint"] = data.fingerprint
        self.logits = self.compute_logits(make_splits(data, self.split), batch_size)
        if self.runtime.is_main:
            arrays = {name: logits for name, (logits, _) in self.logits.items()}
            labels = {f"{name}_labels": labels for name, (_, labels) in self.logits.items()}
            _write_cache(self.cache_paths(), {**key, **arrays, **labels,
                                              "logits_sha256": weights_fingerprint({**arrays, **labels})})
        return self.logits

    def compute_logits(self, splits, batch_size=1024):
        """``{"holdout", "test"}`` -> ``(logits, labels)`` of ``splits`` (``utils.data.make_splits``'), by running its
        weights (the hold-out split's its own where it ``carries_holdout``); nothing cached."""
        logits = {}
        for name in ("holdout", "test"):
            images, labels = splits[name]
            if name == "holdout" and self.carries_holdout:
                logits[name] = (self.out_of_fold_logits(labels), labels)
                continue
            desc = f"{self.role or self.arch} on the {name} split" if len(images) else None
            logits[name] = (batched_logits(self, images, self.runtime, batch_size, desc=desc).cpu() if len(images)
                            else torch.zeros(0, self.checkpoint["num_classes"]), labels)
        return logits

    def out_of_fold_logits(self, labels):
        """The checkpoint's own hold-out logits, checked against the hold-out ``labels`` of its split."""
        logits = self.checkpoint["holdout_logits"].float()
        if len(logits) != len(labels):
            raise UserError(f"{self.path} holds hold-out scores of {len(logits)} images, and its split has "
                            f"{len(labels)}; retrain it on this data with --force")
        return logits


def _write_cache(paths, cache):
    """Into the first of ``paths`` that can be written, with a note when it is not the first."""
    for path in paths:
        try:
            save_checkpoint(path, cache)
        except (CheckpointError, OSError):  # a read-only folder, a full disk
            continue
        if path != paths[0]:
            print(f"note: cannot write {paths[0]}; the logits are cached in {path}")
        return
    print(f"note: cannot write {' nor '.join(map(str, paths))}; the logits are not cached and will be computed "
          "again next time")


def _read_cache(path, key):
    if not path.exists():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: computed again
        return None
    if not all(cached.get(k) == v for k, v in key.items()):
        return None
    tensors = {k: v for k, v in cached.items() if k.startswith(("holdout", "test"))}
    if weights_fingerprint(tensors) != cached.get("logits_sha256"):
        print(f"note: {path} does not match its fingerprint (changed or damaged); the logits are computed again")
        return None
    return {name: (cached[name], cached[f"{name}_labels"]) for name in ("holdout", "test")}
