"""Self-describing checkpoints: written atomically, loaded as data, refused clearly when wrong."""

import hashlib
import os
import zipfile
from pathlib import Path

import torch
import torchvision

from models import build_model
from utils.cli import UserError
from utils.published import is_published_file
from utils.runs import CHECKPOINT_ROOT, experiments_holding
from utils.weights import load_published

FORMAT = "mskd-checkpoint/2"
# Format 1 called "googlenet" what is now "googlenet32" (no max-pooling before the inception blocks).
RENAMED_IN_FORMAT_2 = {"googlenet": "googlenet32"}


class CheckpointError(UserError):
    pass


def weights_fingerprint(state_dict):
    """sha256 of a state_dict's names and values: identifies one set of weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def clean_state_dict(model):
    """The plain module's weights: no ``_orig_mod.`` (compile) or ``module.`` (DDP) prefixes."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_checkpoint(path, checkpoint):
    """Write ``checkpoint`` to a temporary file beside ``path``, then rename: never half-written."""
    save_checkpoints([(path, checkpoint)])


def save_checkpoints(writes):
    """Write each ``(path, checkpoint)`` of ``writes`` to a temporary file beside its path, then rename them all:
    none half-written, and none renamed unless every one was written."""
    versions = {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}
    staged = []
    try:
        for path, checkpoint in writes:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint = {"format": FORMAT, "versions": versions, **checkpoint}
            if "model" in checkpoint:
                checkpoint["weights_sha256"] = weights_fingerprint(checkpoint["model"])
            staged.append((path.with_name(f".{path.name}.{os.getpid()}.tmp"), path))
            torch.save(checkpoint, staged[-1][0])
        for tmp, path in staged:
            os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk shows as either, by where torch.save notices it
        raise CheckpointError(f"could not write {path} ({getattr(e, 'strerror', None) or e}); "
                              f"{'the previous file is kept' if path.exists() else 'nothing was written'}") from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def load_checkpoint(path, hint, kind=None, arch=None):
    """Load a checkpoint as data (``weights_only=True``) and check what it holds.

    ``hint`` is the command that produces the right file; it ends every error message. A published weights file
    (``.pt.gz``, ``utils/weights.py``) gives the same dict, its weights upcast to float32 and fingerprinted.
    """
    path = Path(path)
    checkpoint = _published(path) if is_published_file(path) else _read(path, hint)
    if kind and checkpoint.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {checkpoint.get('kind')}, not a {kind}; run `{hint}`")
    if arch and checkpoint.get("arch") != arch:
        raise CheckpointError(f"{path} holds a {checkpoint.get('arch')}, not a {arch}; run `{hint}`")
    if "model" in checkpoint and weights_fingerprint(checkpoint["model"]) != checkpoint.get("weights_sha256"):
        raise CheckpointError(f"{path} is corrupt (its weights do not match their fingerprint); run `{hint}` again")
    bad = next((k for k, v in checkpoint.get("model", {}).items()
                if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"{path} holds non-finite weights (NaN or Inf in {bad}): nothing it predicts could be "
                              f"trusted; run `{hint}` again")
    return checkpoint


def _published(path):
    checkpoint = load_published(path)
    return {**checkpoint, "weights_sha256": weights_fingerprint(checkpoint["model"])}


def _read(path, hint):
    if not path.is_file():
        others = experiments_holding(path.name) if CHECKPOINT_ROOT in path.parents else ""
        raise CheckpointError(f"no checkpoint at {path}; run `{hint}` first" +
                              (f" (experiments that have one: {others})" if others else ""))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror}); run `{hint}` or make it readable") from None
    except Exception as e:
        if not looks_saved_by_torch(path):
            raise CheckpointError(f"{path} is not a checkpoint (not a file torch.save writes); give the one that "
                                  f"`{hint}` writes") from None
        if "Weights only load failed" in str(e):
            raise CheckpointError(f"{path} is not a checkpoint of this project (it holds Python objects, not "
                                  f"only tensors and plain data); run `{hint}`") from None
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}); "
                              f"delete it and run `{hint}` again") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in (FORMAT, "mskd-checkpoint/1"):
        raise CheckpointError(f"{path} is not a checkpoint of this project; run `{hint}`")
    if checkpoint["format"] == "mskd-checkpoint/1" and "arch" in checkpoint:
        checkpoint["arch"] = RENAMED_IN_FORMAT_2.get(checkpoint["arch"], checkpoint["arch"])
    return checkpoint


def looks_saved_by_torch(path):
    """Whether ``torch.save`` could have written a file: a pickle (the legacy format), or a zip archive that holds a
    ``data.pkl`` or whose directory, at its end, is gone (truncated). Other zip archives (numpy's ``.npz``) are not."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        return head[:1] == b"\x80"
    try:
        with zipfile.ZipFile(path) as archive:
            return any(Path(name).name == "data.pkl" for name in archive.namelist())
    except zipfile.BadZipFile:
        return True


def model_from_checkpoint(checkpoint, path, hint):
    """Rebuild the network a checkpoint describes (``arch``, ``num_classes`` and the
    ``model_args`` of ``build_model``, if any) and load its weights; never downloads."""
    try:
        model = build_model(checkpoint["arch"], checkpoint["num_classes"], **checkpoint.get("model_args", {}),
                            load_weights=False)
    except (ValueError, TypeError, KeyError) as e:  # an unknown architecture, model_args it does not take
        raise CheckpointError(f"{path} describes a network this code cannot build ({e}); run `{hint}` again with "
                              "this version") from None
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise CheckpointError(f"{path}: weights do not fit {checkpoint['arch']} ({first[0].strip()}); "
                              f"run `{hint}` again") from None
    return model
