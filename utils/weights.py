"""Published weights: trained networks as they are shared beside a results bundle, small enough for git and for
what a GPU job hands back, loaded as data and checked file by file.

A published folder is ``<bundle>/weights/`` (``utils/published.py`` finds them): ``manifest.json`` and one file per
network, ``<id>-<arch>.pt.gz`` (``student1-densenet121.pt.gz``, on request ``teacher-resnet50.pt.gz``), a
selector's ``<id>.pt.gz`` (``selector.pt.gz``). Each is the gzip of a ``torch.save`` of a plain dict: the
network's checkpoint record (``utils.trained``: kind, arch, num_classes, model_args, split, data fingerprint,
classes, its config with its test-time views ``tta``, its provenance; a student's KD and teacher, a selector's
students and cross-fitting), and

  model            its weights: floating tensors in bfloat16, integer buffers as they are (no optimizer, EMA
                   or resume state)
  holdout_logits   float32 logits on its hold-out split, measured at export from these weights (the selector's:
                   its out-of-fold scores): routing is fitted on them, so predict.py needs no data
  holdout_labels   the hold-out labels they go with
  published        the format, and the checkpoint it was made from (its path and weights fingerprint)

``manifest.json`` lists every file with its sha256 and bytes, and each network's hold-out and test accuracy as
measured in the published precision (``utils/export.py``). Loading (``load_published``, which
``utils.checkpoint.load_checkpoint`` calls for a ``.pt.gz`` file) checks the file's sha256 against the manifest
before unpacking it, reads it with ``torch.load(weights_only=True)`` and upcasts the weights to float32: it gives
what ``load_checkpoint`` gives for a checkpoint, so ``Network`` and everything above it work unchanged.
"""

import gzip
import hashlib
import io
import json
import re
from pathlib import Path

import torch

from utils.cli import UserError
from utils.published import FIX, FORMAT, MANIFEST, PAIRS, is_published_file, read_manifest, refuse_existing
from utils.runs import write_folder_atomically
from utils.trained import NOT_RECORDED

PRECISION = torch.bfloat16
MAX_FILE_BYTES = 15 * 2**20  # each published file: within what git and a GPU job's hand-back take (16 MiB)
NOT_PUBLISHED = (*NOT_RECORDED, "format", "versions", "weights_sha256")


def rounded(state_dict):
    """Floating tensors in the published precision, the others (``num_batches_tracked``) as they are."""
    return {k: v.to(PRECISION) if v.is_floating_point() else v for k, v in state_dict.items()}


def upcast(state_dict):
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def published_record(checkpoint, holdout_logits, holdout_labels, source):
    """What a published file holds of a checkpoint (``checkpoint["model"]`` already rounded, ``rounded``), with
    its hold-out logits and labels; ``source``: the checkpoint it comes from (``{"path", "weights_sha256"}``)."""
    record = {k: v for k, v in checkpoint.items() if k not in NOT_PUBLISHED}
    return {**record, "model": rounded(checkpoint["model"]), "holdout_logits": holdout_logits.float().contiguous(),
            "holdout_labels": holdout_labels, "published": {"format": FORMAT, "from": source}}


def pack(record):
    """The bytes of a published file: ``torch.save`` of ``record``, gzipped (no time stamp: the same record gives
    the same bytes)."""
    buffer = io.BytesIO()
    torch.save(record, buffer)
    return gzip.compress(buffer.getvalue(), compresslevel=9, mtime=0)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def load_published(path):
    """The checkpoint dict of a published file, its weights upcast to float32 (``weights_sha256`` aside, which
    ``load_checkpoint`` adds); a file changed, truncated or missing, or not listed in its folder's manifest, is
    refused in one line naming it."""
    path = Path(path)
    folder = path.parent
    fix = FIX.replace("FOLDER", str(folder))
    entry = next((e for e in read_manifest(folder)["networks"].values() if e["file"] == path.name), None)
    if entry is None:
        raise UserError(f"{path} is not listed in {folder / MANIFEST}; {fix}")
    data = checked_bytes(folder, entry)
    try:
        record = torch.load(io.BytesIO(gzip.decompress(data)), map_location="cpu", weights_only=True)
    except Exception as e:  # its sha256 is the manifest's: the manifest was written for another file
        raise UserError(f"{path} cannot be unpacked ({type(e).__name__}); {fix}") from None
    for link in [*record.get("students", []), *([record["teacher"]] if record.get("teacher") else [])]:
        if is_published_file(link["path"]):  # a link to a file of the same folder
            link["path"] = str(folder / link["path"])
    return {**record, "model": upcast(record["model"])}


def checked_bytes(folder, entry):
    """The bytes of the file of the manifest's ``entry``, refused in one line where it is missing or its sha256 is
    not the manifest's."""
    path = Path(folder) / entry["file"]
    fix = FIX.replace("FOLDER", str(folder))
    if not path.is_file():
        raise UserError(f"{path} is missing (listed in {Path(folder) / MANIFEST}); {fix}")
    data = path.read_bytes()
    if sha256(data) != entry["sha256"]:
        raise UserError(f"{path} was changed or truncated ({len(data)} bytes, and its sha256 is not the one "
                        f"{MANIFEST} lists); {fix}")
    return data


def keep_pair(folder, pair, out, force=False):
    """Write ``out``: the published folder ``folder`` with one pair of students and its selector (``PAIRS``), the
    teacher too where it is published, listed as the ``student1``... and ``selector`` that every script routes. The
    files are copied byte for byte under their names (a selector's file names its students' files), each checked
    against the manifest first; ``out`` may be ``folder`` itself, with ``force``. Returns the new manifest."""
    manifest = read_manifest(folder)
    prefix, selector = PAIRS[pair]
    kept = {}
    for k, entry in manifest["networks"].items():
        if re.fullmatch(prefix + r"\d+", k):
            kept[f"student{k.removeprefix(prefix)}"] = entry
        elif k in ("teacher", selector):
            kept["selector" if k == selector else k] = entry
    if "selector" not in kept or "student1" not in kept:
        raise UserError(f"{folder} holds no {pair} with their selector ({prefix}1..., {selector}); its networks: "
                        f"{', '.join(manifest['networks'])}")
    files = {entry["file"]: checked_bytes(folder, entry) for entry in kept.values()}
    kept_manifest = {**manifest, "networks": kept, "pair": pair}
    write_folder(out, files, kept_manifest, force)
    return kept_manifest


def check_sizes(files, allowed=()):
    """Refuse a published file over ``MAX_FILE_BYTES`` (``files``: ``{name: bytes}``) but those of ``allowed``,
    which get a note."""
    for name, data in files.items():
        if len(data) <= MAX_FILE_BYTES:
            continue
        size = f"{name} would be {len(data) / 2**20:.1f} MiB, over the {MAX_FILE_BYTES / 2**20:.0f} MiB of a " \
               "published file"
        if name not in allowed:
            raise UserError(f"{size}: it could neither be kept in git nor handed back by a GPU job")
        print(f"note: {size}: keep it on your own machines (it cannot be kept in git nor handed back by a GPU job)")


def write_folder(out, files, manifest, force=False):
    """Write the published folder ``out`` (``files``: ``{name: bytes}``, and ``manifest.json``), never half-written
    (``write_folder_atomically``). An existing folder of published weights is replaced only with ``force``, any
    other never."""
    refuse_existing(out, force)

    def write(tmp):
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    write_folder_atomically(out, write)
