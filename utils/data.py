"""CIFAR-10 from any local copy, decoded once and cached; splits; a device-resident loader.

Sources ``load_cifar10`` understands (``data_dir`` may point at any of them, or at a
folder holding exactly one):

* the official ``cifar-10-batches-py`` folder (what torchvision downloads);
* an image-folder tree ``train/<class>/*`` and ``test/<class>/*`` of PNG or JPEG files;
* a ``.tar.gz``, ``.tgz``, ``.tar`` or ``.zip`` archive of such a tree;
* torchvision's download of the official files, with ``download=True``.
"""

import functools
import hashlib
import io
import os
import pickle
import tarfile
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from utils.augment import Augmentation
from utils.cli import UserError, progress
from utils.images import to_rgb
from utils.split import CLASSES, TEST_SIZE, TRAIN_SIZE

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BATCH_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
FIX_HINT = "point --data-dir (or CIFAR10_DIR) at a CIFAR-10 copy, or add --download"
CACHE_KEYS = {"train_images", "train_labels", "test_images", "test_labels", "fingerprint"}


class DataError(UserError):
    pass


@dataclass
class Cifar10:
    train_images: torch.Tensor  # uint8 (50000, 3, 32, 32)
    train_labels: torch.Tensor  # int64 (50000,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    fingerprint: str  # sha256 of the decoded pixels and labels, whatever the source
    classes: tuple = CLASSES


def default_cache_dir():
    return Path(os.environ.get("CIFAR10_CACHE") or Path.home() / ".cache" / "mskd-cifar10")  # empty: unset


def load_cifar10(data_dir, download=False, cache_dir=None, verbose=True, allow_partial=False):
    """Load CIFAR-10 from ``data_dir``; decode once, then serve from a cache keyed by the source.

    A copy with fewer images than the official 50,000 + 10,000 (a cut archive, a partial tree)
    is refused unless ``allow_partial``.
    """
    data_dir = Path(data_dir).expanduser()
    source = _find_source(data_dir)
    if source is None and download:
        _download(data_dir)
        source = _find_source(data_dir)
    if source is None:
        check_source(data_dir)  # refuses: there is nothing there
    kind, path = source
    cache = Path(cache_dir or default_cache_dir()) / f"cifar10-{_source_key(kind, path)}.npz"
    arrays = _read_cache(cache)
    if arrays is None:
        if verbose:
            print(f"decoding CIFAR-10 from {path} (once; cached in {cache})")
        arrays = _read_batches(path) if kind == "batches" else _read_tree(kind, path, verbose)
        arrays["fingerprint"] = np.array(_fingerprint(arrays))
        _write_cache(cache, arrays)
    counts = len(arrays["train_labels"]), len(arrays["test_labels"])
    if counts != (TRAIN_SIZE, TEST_SIZE) and not allow_partial:
        raise DataError(f"{path} holds {counts[0]:,} training and {counts[1]:,} test images, not CIFAR-10's "
                        f"{TRAIN_SIZE:,} and {TEST_SIZE:,}: the copy is incomplete; use an intact copy, or add "
                        "--partial-data to train on it as it is")
    return Cifar10(
        train_images=torch.from_numpy(arrays["train_images"]),
        train_labels=torch.from_numpy(arrays["train_labels"]).long(),
        test_images=torch.from_numpy(arrays["test_images"]),
        test_labels=torch.from_numpy(arrays["test_labels"]).long(),
        fingerprint=str(arrays["fingerprint"]),
    )


def check_source(data_dir, download=False):
    """Refuse, before anything is written, a ``data_dir`` that holds no CIFAR-10 and is not to be downloaded."""
    data_dir = Path(data_dir).expanduser()
    if not download and _find_source(data_dir) is None:
        raise DataError(f"no CIFAR-10 found at {data_dir} (looked for cifar-10-batches-py/, train/ and test/ "
                        f"image folders, or a .tar.gz/.tar/.zip archive); {FIX_HINT}")


def _find_source(path):
    if path.is_file():
        if path.name.endswith(ARCHIVE_SUFFIXES):
            return "archive", path
        raise DataError(f"{path} is not a .tar.gz/.tar/.zip archive; {FIX_HINT}")
    if not path.is_dir():
        return None
    for folder in (path, path / "cifar-10-batches-py"):
        if (folder / "data_batch_1").exists():
            return "batches", folder
    trees = [p for p in (path, *sorted(path.iterdir())) if (p / "train").is_dir() and (p / "test").is_dir()]
    if trees:
        return "tree", trees[0]
    archives = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))
    if len(archives) > 1:
        raise DataError(f"{path} holds several archives ({', '.join(a.name for a in archives)}); "
                        "point --data-dir at one of them")
    return ("archive", archives[0]) if archives else None


def _download(root):
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # torchvision raises URLError, OSError or RuntimeError, by version
        raise DataError(f"could not download CIFAR-10 into {root} ({type(e).__name__}: {e}); "
                        "without internet, point --data-dir or CIFAR10_DIR at a local copy") from None


def _source_key(kind, path):
    """The decode cache's key: the source's kind and the name and content of each of its files (not their sizes and
    times: a copy with other pixels of the same size and time is another source)."""
    h = hashlib.sha256(kind.encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(f"{f.relative_to(path) if f != path else ''}\n".encode())
        with open(f, "rb") as stream:
            h.update(hashlib.file_digest(stream, "sha256").digest())
    return h.hexdigest()[:16]


def _fingerprint(arrays):
    h = hashlib.sha256()
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()[:16]


def _read_cache(cache):
    if not cache.exists():
        return None
    try:
        with np.load(cache, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        arrays = {}
    if not CACHE_KEYS <= arrays.keys():
        print(f"warning: ignoring unreadable or incomplete cache {cache}; decoding again")
        return None
    return arrays


def _write_cache(cache, arrays):
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, cache)
    except OSError as e:
        print(f"warning: could not write the CIFAR-10 cache {cache} ({e}); the next load decodes again")


def _read_batches(folder):
    def load(name):
        try:
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            return batch["data"].reshape(-1, 3, 32, 32), np.asarray(batch["labels"], dtype=np.int64)
        except FileNotFoundError:
            raise DataError(f"{folder / name} is missing: the cifar-10-batches-py folder is incomplete; "
                            f"{FIX_HINT}") from None
        except Exception as e:
            raise DataError(f"{folder / name} is damaged ({type(e).__name__}: {e}); {FIX_HINT}") from None

    train = [load(name) for name in BATCH_FILES[:5]]
    test_images, test_labels = load(BATCH_FILES[5])
    return {
        "train_images": np.concatenate([x for x, _ in train]), "train_labels": np.concatenate([y for _, y in train]),
        "test_images": test_images, "test_labels": test_labels,
    }


def _tree_members(kind, path):
    """Yield ``(relative path, read())`` for every file of a tree or archive, in any order."""
    if kind == "tree":
        for f in path.rglob("*"):
            if f.is_file():
                yield f.relative_to(path).as_posix(), f.read_bytes
    elif path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: z.read(info)
    else:
        with tarfile.open(path, "r:*") as t:
            for member in t:
                if member.isfile():
                    yield member.name, t.extractfile(member).read


def _read_tree(kind, path, verbose):
    images = {"train": {c: [] for c in CLASSES}, "test": {c: [] for c in CLASSES}}
    found = []  # (split, class, file name, encoded bytes, where)
    seen = {}  # (split, class, file name) -> its name in the tree
    try:
        for name, read in _tree_members(kind, path):
            parts = name.split("/")
            if "__MACOSX" in parts or parts[-1].startswith("."):  # macOS metadata, not images
                continue
            if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_SUFFIXES) or parts[-3] not in images:
                continue
            split, cls, file = parts[-3:]
            if cls not in images[split]:
                raise DataError(f"{path}: unexpected class folder {split}/{cls}; CIFAR-10 has {', '.join(CLASSES)}")
            if (split, cls, file) in seen:
                raise DataError(f"{path} holds {split}/{cls}/{file} twice ({seen[split, cls, file]} and {name}): two "
                                "copies of the tree; point --data-dir at one copy")
            seen[split, cls, file] = name
            found.append((split, cls, file, read(), f"{path}:{name}"))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path} is damaged or not a valid archive ({type(e).__name__}: {e}); "
                        "replace it with an intact copy") from None
    for (split, cls, file, _, _), array in zip(found, _decode_all([f[3:] for f in found], verbose)):
        images[split][cls].append((file, array))
    arrays = {}
    for split, by_class in images.items():
        missing = [c for c, files in by_class.items() if not files]
        if missing:
            raise DataError(f"{path}: {split}/ has no images of class {', '.join(missing)}; "
                            "the copy is incomplete, so it is not loaded")
        ordered = [(label, array) for label, c in enumerate(CLASSES) for _, array in sorted(by_class[c])]
        arrays[f"{split}_images"] = np.stack([a for _, a in ordered]).transpose(0, 3, 1, 2).copy()
        arrays[f"{split}_labels"] = np.array([label for label, _ in ordered], dtype=np.int64)
    return arrays


def _decode_all(encoded, verbose, chunk=2000):
    """``_decode`` of every ``(bytes, where)``, in order, in parallel processes (PIL decodes holding the GIL, so
    threads would not help)."""
    chunks = [encoded[i:i + chunk] for i in range(0, len(encoded), chunk)]
    workers = min(os.cpu_count() or 1, len(chunks))
    decoded = []
    with progress(len(encoded), "decoding", disable=not verbose) as bar:
        pool = ProcessPoolExecutor(workers) if workers > 1 else None
        try:
            for part in pool.map(_decode_chunk, chunks) if pool else map(_decode_chunk, chunks):
                decoded += part
                bar.update(len(part))
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
    return decoded


def _decode_chunk(encoded):
    return [_decode(data, where) for data, where in encoded]


def _decode(data, where):
    try:
        image = to_rgb(Image.open(io.BytesIO(data)))
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"damaged image {where} ({e})") from None
    if image.size != (32, 32):
        raise DataError(f"{where} is {image.size[0]}x{image.size[1]}, not a 32x32 CIFAR-10 image")
    return np.asarray(image, dtype=np.uint8)


# ----------------------------------------------------------------------------- splits

def stratified_indices(labels, n, seed):
    """``n`` indices of ``labels``, spread evenly over the classes, chosen with ``seed``; sorted."""
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    quota = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    chosen = []
    for c, q in zip(classes, quota):
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=g)[:q]])
    return torch.cat(chosen).sort().values


def stratified_folds(labels, folds, seed):
    """``(N,)``: each image's fold, 0 to ``folds`` - 1. Each class's images are shuffled (with ``seed``) and dealt
    to the folds in turn, the deal going on from class to class: every fold holds every class that has at
    least ``folds`` images, and fold sizes differ by at most one."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    dealt = 0
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        fold[members] = (dealt + torch.arange(len(members))) % folds
        dealt += len(members)
    return fold


def holdout_split(labels, holdout, seed=0):
    """Split training indices into ``(train, holdout)``: stratified, disjoint, fixed by ``seed``."""
    if not 0 <= holdout < len(labels):
        raise UserError(f"--holdout must be between 0 and {len(labels) - 1}, not {holdout}")
    held = stratified_indices(labels, holdout, seed) if holdout else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().flatten(), held


def data_record(data, split):
    """What a checkpoint records about the data it was trained on."""
    return {"classes": list(data.classes), "data_fingerprint": data.fingerprint, "split": split.as_dict()}


def make_splits(data, split):
    """``{"train", "holdout", "test"}`` -> ``(uint8 images, labels)`` of ``split`` (a ``Split``)."""
    train_idx, holdout_idx = holdout_split(data.train_labels, split.holdout, split.split_seed)
    splits = {
        "train": (data.train_images[train_idx], data.train_labels[train_idx]),
        "holdout": (data.train_images[holdout_idx], data.train_labels[holdout_idx]),
        "test": (data.test_images, data.test_labels),
    }
    if split.limit:
        for name, (x, y) in splits.items():
            keep = stratified_indices(y, split.limit, split.split_seed + 1)
            splits[name] = (x[keep], y[keep])
    return splits


# ----------------------------------------------------------------------------- loader

@functools.cache
def _mean_std(device):
    """Made once per device: creating them per batch would copy from the host, and wait, every step."""
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)


def normalize(images, channels_last=False):
    """uint8 ``(B, 3, H, W)`` -> float32, standardised with the CIFAR-10 mean and std."""
    mean, std = _mean_std(images.device)
    x = (images.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def pad_batch(x, size):
    """``x`` with zero images appended up to ``size``: on a GPU every batch then has one shape, so cuDNN
    selects its kernels once (evaluation is per image, so the padding changes no other image's output)."""
    if len(x) >= size:
        return x
    padded = torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))])
    return padded.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
        memory_format=torch.channels_last) and x.dim() == 4 else padded


class DeviceLoader:
    """Batches of a whole split kept on ``device`` as one uint8 tensor.

    Training: a seeded permutation per epoch (each rank takes its shard), in full batches only
    (the permutation's last ``len % batch_size`` images sit the epoch out: every step has one
    shape, so a GPU selects its kernels once), and the ``augment`` of ``utils.augment.Augmentation``
    on the device (default: the classic crop and flip), drawn from a generator seeded per batch,
    so that iterating from a batch in mid-epoch (``batches(start)``, for an exact resume) gives
    what a whole epoch would have given there. Evaluation: the split in order, each rank a
    disjoint shard, the last batch possibly short. ``targets`` may be class indices ``(N,)`` or
    soft targets ``(N, K)``.
    """

    def __init__(self, images, targets, batch_size, device, train=False, augment=None, seed=0,
                 rank=0, world_size=1):
        self.images = images.to(device)
        self.targets = targets.to(device)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.train = train
        self.augment = (Augmentation(padding="zeros") if train else None) if augment is None else augment
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _indices(self):
        n = len(self.images)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        order = torch.randperm(n, generator=torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % 2**63))
        if self.world_size > 1:
            order = torch.cat([order, order[:(-n) % self.world_size]])  # equal shards: every rank, same steps
        return order[self.rank::self.world_size]

    @property
    def num_samples(self):
        """Images one epoch serves (on this rank)."""
        return len(self) * self.batch_size if self.train else self._shard_size()

    def _shard_size(self):
        """Images of this rank's shard: training shards are padded to equal sizes, evaluation shards are not."""
        n = len(self.images)
        return -(-n // self.world_size) if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self):
        n = self._shard_size()
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self):
        return self.batches()

    def batches(self, start=0):
        """The epoch's batches from batch number ``start`` on."""
        indices = self._indices().to(self.device)
        generator = torch.Generator(self.device)
        channels_last = self.device.type == "cuda"
        for batch in range(start, len(self)):
            idx = indices[batch * self.batch_size:(batch + 1) * self.batch_size]
            x, y = self.images[idx], self.targets[idx]
            if not self.augment:
                yield normalize(x, channels_last), y
                continue
            seed = (((self.seed * 100_003 + self.epoch) * 100_003 + batch) * 64 + self.rank) % 2**63
            x = self.augment.images(x, generator.manual_seed(seed))
            yield self.augment.mix_batch(normalize(x, channels_last), y, seed)
