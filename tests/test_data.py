"""The data layer: every source format, the decode cache, clear errors, splits and the device loader."""

import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from urllib.error import URLError

import numpy as np
import pytest
import torch

import utils.data as data_mod
from tests.conftest import REPO, write_tree
from utils.cli import UserError
from utils.data import (
    CLASSES,
    MEAN,
    STD,
    Cifar10,
    DataError,
    DeviceLoader,
    holdout_split,
    load_cifar10,
    make_splits,
    stratified_indices,
)
from utils.split import Split

OFFICIAL_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_CLASS = (4, 2)


def expected_tree_arrays(per_class=PER_CLASS):
    """What ``write_tree`` encodes: class-major, files in name order, pixel (0, 0) = file index."""
    out = {}
    for split, n in zip(("train", "test"), per_class):
        images = np.zeros((10 * n, 3, 32, 32), dtype=np.uint8)
        labels = np.repeat(np.arange(10), n)
        for j, label in enumerate(labels):
            images[j] = 20 * label + 10
            images[j, :, 0, 0] = j % n
        out[split] = (torch.from_numpy(images), torch.from_numpy(labels).long())
    return out


def assert_layout(data, n_train=10 * PER_CLASS[0], n_test=10 * PER_CLASS[1]):
    assert isinstance(data, Cifar10)
    assert data.train_images.shape == (n_train, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (n_test, 3, 32, 32) and data.test_images.dtype == torch.uint8
    assert data.train_labels.shape == (n_train,) and data.train_labels.dtype == torch.int64
    assert data.test_labels.shape == (n_test,) and data.test_labels.dtype == torch.int64
    assert tuple(data.classes) == OFFICIAL_CLASSES
    assert isinstance(data.fingerprint, str) and len(data.fingerprint) >= 8


def assert_tree_pixels(data, exact=True, per_class=PER_CLASS):
    expected = expected_tree_arrays(per_class)
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        want_images, want_labels = expected[split]
        assert torch.equal(labels, want_labels), split
        if exact:
            assert torch.equal(images, want_images), split
        else:  # lossy JPEG: away from the odd pixel (0, 0), the class value survives closely
            centre = images[:, :, 8:, 8:].int()
            want = (20 * labels + 10).view(-1, 1, 1, 1)
            assert (centre - want).abs().max() <= 3, split


def make_archive(tree, archive, top="cifar10-png"):
    """Archive ``tree`` (holding train/ and test/) under a top-level folder, like the real archive."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as z:
            for f in sorted(tree.rglob("*")):
                z.write(f, f"{top}/{f.relative_to(tree).as_posix()}")
    else:
        with tarfile.open(archive, "w:gz" if archive.name.endswith(".gz") else "w") as t:
            t.add(tree, arcname=top)
    return archive


def write_batches(folder, per_batch=3, n_test=4, seed=0):
    """An official-format ``cifar-10-batches-py`` folder with random pixels; returns the expected arrays."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for i, name in enumerate(data_mod.BATCH_FILES):
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=n)]
        labels[0] = i % 10
        batch = {"batch_label": f"batch {i}", "labels": labels, "data": data,
                 "filenames": [f"img_{i}_{j}.png" for j in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(OFFICIAL_CLASSES), "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    train = [batches[name] for name in data_mod.BATCH_FILES[:5]]
    return {
        "train_images": torch.from_numpy(np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32)),
        "train_labels": torch.tensor([y for _, labels in train for y in labels]),
        "test_images": torch.from_numpy(batches["test_batch"][0].reshape(-1, 3, 32, 32)),
        "test_labels": torch.tensor(batches["test_batch"][1]),
    }


def load(path, tmp_path, **kwargs):
    """A small test copy: fewer images than CIFAR-10, so loaded with ``allow_partial``."""
    return load_cifar10(path, cache_dir=tmp_path / "cache", verbose=False, allow_partial=True, **kwargs)


# ----------------------------------------------------------------------------- source formats

def test_classes_are_the_official_order():
    assert CLASSES == OFFICIAL_CLASSES


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_image_folder_tree(tmp_path, fmt):
    tree = write_tree(tmp_path / "cifar", fmt=fmt)
    data = load(tree, tmp_path)
    assert_layout(data)
    assert_tree_pixels(data, exact=fmt == "png")


@pytest.mark.parametrize("name", ["cifar.tar.gz", "cifar.tgz", "cifar.tar", "cifar.zip"])
def test_archive_of_a_tree(tmp_path, name):
    tree = write_tree(tmp_path / "src")
    archive = make_archive(tree, tmp_path / name)
    data = load(archive, tmp_path)
    assert_layout(data)
    assert_tree_pixels(data)


def test_pixels_and_fingerprint_do_not_depend_on_the_container(tmp_path):
    tree = write_tree(tmp_path / "src")
    from_tree = load(tree, tmp_path)
    from_zip = load(make_archive(tree, tmp_path / "c.zip"), tmp_path)
    assert torch.equal(from_tree.train_images, from_zip.train_images)
    assert from_tree.fingerprint == from_zip.fingerprint


def test_tree_with_an_extra_top_level_folder(tmp_path):
    # data_dir may be the folder that holds the tree (as after unpacking the real archive)
    write_tree(tmp_path / "unpacked" / "cifar10-png")
    data = load(tmp_path / "unpacked", tmp_path)
    assert_layout(data)
    assert_tree_pixels(data)


@pytest.mark.parametrize("point_at_parent", [False, True])
def test_official_python_batches(tmp_path, point_at_parent):
    expected = write_batches(tmp_path / "root" / "cifar-10-batches-py")
    path = tmp_path / "root" if point_at_parent else tmp_path / "root" / "cifar-10-batches-py"
    data = load(path, tmp_path)
    assert_layout(data, n_train=15, n_test=4)
    for key, value in expected.items():
        assert torch.equal(getattr(data, key), value.to(getattr(data, key).dtype)), key
    assert data.train_labels.min() >= 0 and data.train_labels.max() <= 9


def test_incomplete_batches_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        load(folder, tmp_path)


def test_damaged_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder)
    content = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match="data_batch_3 is damaged"):
        load(folder, tmp_path)


def test_folder_holding_exactly_one_archive(tmp_path):
    tree = write_tree(tmp_path / "src")
    (tmp_path / "data").mkdir()
    make_archive(tree, tmp_path / "data" / "cifar10-png.tar.gz")
    data = load(tmp_path / "data", tmp_path)
    assert_layout(data)
    assert_tree_pixels(data)


def test_folder_holding_two_archives_is_refused(tmp_path):
    tree = write_tree(tmp_path / "src")
    (tmp_path / "data").mkdir()
    make_archive(tree, tmp_path / "data" / "a.tar.gz")
    make_archive(tree, tmp_path / "data" / "b.zip")
    with pytest.raises(DataError, match="several archives"):
        load(tmp_path / "data", tmp_path)


# ----------------------------------------------------------------------------- cache

@pytest.mark.parametrize("kind", ["tree", "batches"])
def test_second_load_comes_from_the_cache(tmp_path, monkeypatch, kind):
    if kind == "tree":
        source, reader = write_tree(tmp_path / "cifar"), "_read_tree"
    else:
        source, reader = tmp_path / "cifar-10-batches-py", "_read_batches"
        write_batches(source)
    cache = tmp_path / "cache"
    first = load_cifar10(source, cache_dir=cache, verbose=False, allow_partial=True)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].startswith("cifar10-") and files[0].endswith(".npz"), files

    def decode_again(*args, **kwargs):
        raise AssertionError("decoded again although the cache is there")

    monkeypatch.setattr(data_mod, reader, decode_again)
    second = load_cifar10(source, cache_dir=cache, verbose=False, allow_partial=True)
    assert second.fingerprint == first.fingerprint
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(first, key), getattr(second, key)), key
    assert sorted(p.name for p in cache.iterdir()) == files  # no stray temporary files


def test_cache_follows_the_source(tmp_path):
    from PIL import Image

    tree = write_tree(tmp_path / "cifar")
    first = load(tree, tmp_path)
    image = tree / "test" / "truck" / "0001.png"
    pixels = np.full((32, 32, 3), 7, dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    os.utime(image, ns=(1, 1))  # a different mtime even on coarse-grained file systems
    second = load(tree, tmp_path)
    assert second.fingerprint != first.fingerprint
    assert int(second.test_images[-1, 0, 5, 5]) == 7


def test_unreadable_cache_is_decoded_again(tmp_path, capsys):
    tree = write_tree(tmp_path / "cifar")
    first = load(tree, tmp_path)
    (cache_file,) = (tmp_path / "cache").iterdir()
    cache_file.write_bytes(b"not an npz file")
    second = load(tree, tmp_path)
    assert second.fingerprint == first.fingerprint
    assert torch.equal(second.train_images, first.train_images)
    assert "cache" in capsys.readouterr().out


# ----------------------------------------------------------------------------- errors

def test_truncated_archive_is_reported_as_damaged(tmp_path):
    archive = make_archive(write_tree(tmp_path / "src"), tmp_path / "cifar.tar.gz")
    content = archive.read_bytes()
    archive.write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match="damaged") as e:
        load(archive, tmp_path)
    assert str(archive) in str(e.value)


def test_truncated_zip_is_reported_as_damaged(tmp_path):
    archive = make_archive(write_tree(tmp_path / "src"), tmp_path / "cifar.zip")
    content = archive.read_bytes()
    archive.write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match="damaged"):
        load(archive, tmp_path)


def test_damaged_image_is_named(tmp_path):
    tree = write_tree(tmp_path / "cifar")
    (tree / "train" / "dog" / "0002.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="dog/0002.png"):
        load(tree, tmp_path)


def test_missing_class_is_named(tmp_path):
    tree = write_tree(tmp_path / "cifar", classes=[c for c in CLASSES if c != "frog"])
    with pytest.raises(DataError, match="frog") as e:
        load(tree, tmp_path)
    assert "bird" not in str(e.value)


def test_unknown_class_folder_is_named(tmp_path):
    tree = write_tree(tmp_path / "cifar")
    (tree / "train" / "aeroplane").mkdir()
    (tree / "train" / "aeroplane" / "0000.png").write_bytes((tree / "train" / "airplane" / "0000.png").read_bytes())
    with pytest.raises(DataError, match="aeroplane"):
        load(tree, tmp_path)


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DataError) as e:
        load(missing, tmp_path)
    message = str(e.value)
    assert str(missing) in message
    assert "--data-dir" in message and "CIFAR10_DIR" in message


def test_data_dir_that_is_not_an_archive(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match="notes.txt"):
        load(other, tmp_path)


def test_download_while_offline(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def offline(root, *args, **kwargs):
        calls.append(root)
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="download") as e:
        load(tmp_path / "data", tmp_path, download=True)
    assert calls, "torchvision's download was not attempted"
    assert "CIFAR10_DIR" in str(e.value) or "--data-dir" in str(e.value)


def test_download_is_skipped_when_the_data_is_there(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise AssertionError("downloaded although a local copy exists")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    assert_layout(load(write_tree(tmp_path / "cifar"), tmp_path, download=True))


def test_cli_missing_data_dir_is_one_line_without_traceback():
    """The exit path of every refusal, in a process of its own (the other refusals are checked in-process)."""
    result = subprocess.run([sys.executable, "teacherTrain.py", "--data-dir", "/nonexistent", "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "/nonexistent" in lines[0]


# ----------------------------------------------------------------------------- the real archive

def test_real_archive(shared_archive):
    data = load_cifar10(shared_archive, verbose=False)  # the session cache: decoded once per run
    assert data.train_images.shape == (50_000, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (10_000, 3, 32, 32) and data.test_images.dtype == torch.uint8
    assert torch.equal(torch.bincount(data.train_labels, minlength=10), torch.full((10,), 5_000))
    assert torch.equal(torch.bincount(data.test_labels, minlength=10), torch.full((10,), 1_000))
    means = data.train_images.sum(dim=(0, 2, 3), dtype=torch.int64).double() / (50_000 * 32 * 32 * 255)
    assert torch.allclose(means, torch.tensor([0.491, 0.482, 0.447], dtype=torch.float64), atol=0.01), means
    assert torch.allclose(means, torch.tensor(MEAN, dtype=torch.float64), atol=0.01)


# ----------------------------------------------------------------------------- splits

def balanced_labels(per_class=50):
    return torch.arange(10).repeat(per_class)


def test_holdout_split_is_stratified_disjoint_and_complete():
    labels = balanced_labels()
    train, held = holdout_split(labels, 100, seed=0)
    assert len(held) == 100 and len(train) == 400
    assert torch.equal(torch.bincount(labels[held], minlength=10), torch.full((10,), 10))
    assert torch.equal(torch.bincount(labels[train], minlength=10), torch.full((10,), 40))
    assert not set(train.tolist()) & set(held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(len(labels)))


def test_holdout_split_is_fixed_by_its_seed():
    labels = balanced_labels()
    a_train, a_held = holdout_split(labels, 100, seed=3)
    b_train, b_held = holdout_split(labels, 100, seed=3)
    assert torch.equal(a_held, b_held) and torch.equal(a_train, b_train)
    _, c_held = holdout_split(labels, 100, seed=4)
    assert not torch.equal(a_held, c_held)


def test_holdout_zero_and_out_of_range():
    labels = balanced_labels(5)
    train, held = holdout_split(labels, 0)
    assert len(held) == 0 and torch.equal(train, torch.arange(50))
    for bad in (-1, 50):
        with pytest.raises(UserError, match="--holdout"):
            holdout_split(labels, bad)


def test_stratified_indices_spreads_the_remainder():
    labels = balanced_labels(10)
    chosen = stratified_indices(labels, 23, seed=0)
    counts = torch.bincount(labels[chosen], minlength=10)
    assert counts.sum() == 23 and counts.max() - counts.min() == 1
    assert len(set(chosen.tolist())) == 23


def id_dataset(n_train_per_class=30, n_test_per_class=10):
    """A Cifar10 whose images carry their own index in pixel (0, 0) of channels 0 and 1."""
    def images(n):
        x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
        idx = torch.arange(n)
        x[:, 0, 0, 0], x[:, 1, 0, 0] = (idx // 256).to(torch.uint8), (idx % 256).to(torch.uint8)
        return x

    return Cifar10(images(10 * n_train_per_class), balanced_labels(n_train_per_class),
                   images(10 * n_test_per_class), balanced_labels(n_test_per_class), fingerprint="test")


def ids(images):
    return (images[:, 0, 0, 0].long() * 256 + images[:, 1, 0, 0].long()).tolist()


def test_make_splits_without_limit():
    data = id_dataset()
    splits = make_splits(data, Split(holdout=50, split_seed=0))
    assert len(splits["train"][0]) == 250 and len(splits["holdout"][0]) == 50 and len(splits["test"][0]) == 100
    assert not set(ids(splits["train"][0])) & set(ids(splits["holdout"][0]))
    for name, (x, y) in splits.items():
        source_labels = data.test_labels if name == "test" else data.train_labels
        assert torch.equal(y, source_labels[ids(x)]), name  # images and labels stay paired


def test_make_splits_limit_caps_each_split_balanced():
    data = id_dataset()
    splits = make_splits(data, Split(holdout=50, split_seed=0, limit=20))
    for name, (x, y) in splits.items():
        assert len(x) == len(y) == 20, name
        assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 2)), name
        source_labels = data.test_labels if name == "test" else data.train_labels
        assert torch.equal(y, source_labels[ids(x)]), name
    assert not set(ids(splits["train"][0])) & set(ids(splits["holdout"][0]))
    # a limit above a split's size leaves it whole
    splits = make_splits(data, Split(holdout=30, split_seed=0, limit=40))
    assert len(splits["holdout"][0]) == 30 and len(splits["train"][0]) == 40 and len(splits["test"][0]) == 40


def test_make_splits_holdout_zero_with_limit():
    splits = make_splits(id_dataset(), Split(holdout=0, split_seed=0, limit=20))
    assert len(splits["holdout"][0]) == 0 and len(splits["train"][0]) == 20


# ----------------------------------------------------------------------------- device loader

def unnormalize(x):
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).round().long()


def test_augmented_batches_keep_their_labels(tmp_path):
    data = load(write_tree(tmp_path / "cifar"), tmp_path)
    loader = DeviceLoader(data.train_images, data.train_labels, batch_size=16, device="cpu", train=True, seed=1)
    sizes = []
    for x, y in loader:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and x.shape[0] == y.shape[0]
        sizes.append(len(y))
        pixels = unnormalize(x)
        # a crop shifts by at most 4 pixels, so the centre always shows the image's own class value
        centre = pixels[:, :, 12:20, 12:20]
        assert torch.equal(centre, (20 * y + 10).view(-1, 1, 1, 1).expand_as(centre))
    assert sizes == [16, 16]  # 40 images: full batches only, the 8 left over sit the epoch out


def test_augmentation_changes_images_and_eval_does_not(tmp_path):
    data = load(write_tree(tmp_path / "cifar"), tmp_path)
    targets = torch.arange(len(data.train_images))
    train = DeviceLoader(data.train_images, targets, batch_size=40, device="cpu", train=True, seed=0)
    x, idx = next(iter(train))
    originals = data.train_images[idx].long()
    augmented = unnormalize(x)
    moved = [not torch.equal(a, o) for a, o in zip(augmented, originals)]
    assert sum(moved) >= len(moved) // 2  # crops and flips move the odd pixel (0, 0) or bring in padding
    assert (augmented == 0).any()  # zero padding shows at the borders of shifted crops

    evaluation = DeviceLoader(data.train_images, targets, batch_size=40, device="cpu", train=False)
    x, idx = next(iter(evaluation))
    assert torch.equal(idx, targets)
    assert torch.equal(unnormalize(x), data.train_images.long())


def epoch_ids(loader, epoch):
    loader.set_epoch(epoch)
    return torch.cat([y for _, y in loader]).tolist()


def test_train_loader_serves_full_batches_of_distinct_images_in_a_new_order_each_epoch():
    n = 37
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(n), batch_size=5, device="cpu", train=True, seed=0)
    assert len(loader) == 7 and loader.num_samples == 35  # one shape for every step: the 2 left over sit out
    assert all(len(y) == 5 for _, y in loader)
    first, second = epoch_ids(loader, 0), epoch_ids(loader, 1)
    assert len(set(first)) == len(first) == 35 and len(set(second)) == 35
    assert set(first) != set(second)  # another two sit out the next epoch
    assert first != sorted(first)  # shuffled
    seen = set()
    for epoch in range(20):
        seen |= set(epoch_ids(loader, epoch))
    assert seen == set(range(n))  # no image is left out for good

    again = DeviceLoader(images, torch.arange(n), batch_size=5, device="cpu", train=True, seed=0)
    assert epoch_ids(again, 0) == first and epoch_ids(again, 1) == second
    other_seed = DeviceLoader(images, torch.arange(n), batch_size=5, device="cpu", train=True, seed=1)
    assert epoch_ids(other_seed, 0) != first


def test_eval_loader_is_in_order():
    n = 23
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(n), batch_size=10, device="cpu")
    assert [len(y) for _, y in loader] == [10, 10, 3]
    assert epoch_ids(loader, 0) == list(range(n)) == epoch_ids(loader, 5)


def test_soft_targets_pass_through():
    n = 12
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    soft = torch.softmax(torch.randn(n, 3), dim=1)
    loader = DeviceLoader(images, soft, batch_size=4, device="cpu", train=True)
    got = torch.cat([y for _, y in loader])
    assert got.shape == (n, 3)
    assert torch.allclose(got.sum(1), torch.ones(n))
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, soft.tolist()))


@pytest.mark.parametrize("n", [20, 21])
def test_sharded_loaders_cover_everything(n):
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    targets = torch.arange(n)

    def shards(train):
        loaders = [DeviceLoader(images, targets, batch_size=4, device="cpu", train=train, seed=0, rank=r,
                                world_size=2) for r in range(2)]
        return [epoch_ids(loader, 1) for loader in loaders], loaders

    (a, b), loaders = shards(train=True)
    assert len(a) == len(b) == -(-n // 2) // 4 * 4  # equal shards of full batches: every rank, the same steps
    assert len(loaders[0]) == len(loaders[1])
    assert len(set(a) & set(b)) <= n % 2  # disjoint, but for the one image that evens the shards
    (a, b), _ = shards(train=False)
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(n))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("n, world_size", [(21, 1), (21, 2), (20, 3)])
def test_a_loader_s_length_is_arithmetic_and_what_it_serves(train, n, world_size, monkeypatch):
    loaders = [DeviceLoader(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n), batch_size=4,
                            device="cpu", train=train, rank=r, world_size=world_size) for r in range(world_size)]
    served = [sum(1 for _ in loader) for loader in loaders]
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: pytest.fail("len() drew a permutation"))
    assert [len(loader) for loader in loaders] == served
    assert [loader.num_samples for loader in loaders] == [len(list(range(r, n, world_size))) for r in
                                                          range(world_size)] if not train else \
        [len(loader) * 4 for loader in loaders]
