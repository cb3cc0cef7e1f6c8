"""Shared fixtures: a small synthetic CIFAR-10 image tree, the real archive when present, and one smoke pipeline."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import CLASSES

REPO = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def write_tree(root, per_class=(4, 2), fmt="png", classes=CLASSES):
    """``root/train/<class>/*`` and ``root/test/<class>/*``; every pixel of class k is 20*k+10."""
    for split, n in zip(("train", "test"), per_class):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.full((32, 32, 3), 20 * CLASSES.index(name) + 10, dtype=np.uint8)
                pixels[0, 0] = i  # images of one class differ, so none is a duplicate
                Image.fromarray(pixels).save(folder / f"{i:04d}.{fmt}")
    return root


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """One decode cache for the whole run (subprocesses inherit it), never the user's own; the same for the
    per-user logits cache of checkpoints in read-only folders."""
    cache = tmp_path_factory.mktemp("cifar10-cache")
    os.environ["CIFAR10_CACHE"] = str(cache)
    os.environ["MSKD_LOGITS_CACHE"] = str(tmp_path_factory.mktemp("logits-cache"))
    return cache


@pytest.fixture
def synthetic_tree(tmp_path):
    return write_tree(tmp_path / "cifar")


@pytest.fixture
def shared_archive():
    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"{SHARED_ARCHIVE} is not here")
    return SHARED_ARCHIVE


@pytest.fixture(autouse=True)
def no_unsaved_run_outlives_its_test():
    """A run that a test let fail outside ``utils.cli.run`` is not undone by a later test's failure."""
    yield
    import utils.runs

    utils.runs._UNSAVED.clear()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """``reproduce.py --preset smoke`` once, in a scratch folder: the real archive, else a synthetic tree. Its
    bundle is ``results/smoke/bundle/``, its published weights ``results/smoke/bundle/weights/``."""
    import reproduce

    root = tmp_path_factory.mktemp("smoke")
    data = SHARED_ARCHIVE if SHARED_ARCHIVE.exists() else write_tree(root / "cifar", per_class=(25, 5))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        reproduce.main(["--preset", "smoke", "--data-dir", str(data), "--out", "results/smoke/bundle"])
    finally:
        os.chdir(cwd)
    return root, data


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Small batches on a 2-core machine run much faster without intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); run with `pytest -m cuda`")
