"""Shared fixtures: a small synthetic CIFAR-10 image tree, the real archive when present, and one smoke pipeline."""

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import CLASSES

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "results" / "published" / "h200-2026-11-28"  # the first published run's bundle
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


def visible_lines(text):
    """The lines a terminal shows: a progress bar rewritten in place with ``\\r`` leaves only what follows."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def one_error_line(call, capsys):
    """Run ``call`` as the scripts do (``utils.cli.run``): its exit code 2 and its single ``error:`` line, with no
    traceback (a subprocess check of the same exit path: ``tests/test_data.py``)."""
    from utils.cli import run

    with pytest.raises(SystemExit) as e:
        run(call)
    captured = capsys.readouterr()
    assert e.value.code == 2 and "Traceback" not in captured.err, captured.err
    lines = visible_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


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


SMOKE_FLAGS = ["--preset", "smoke", "--minutes", "3", "--with-specialists", "mcl", "--partial-data"]


@pytest.fixture
def own_handlers():
    """SIGINT and SIGTERM handlers owned by the test: a signal that training lets through is
    recorded instead of ending pytest, and training must hand these back when it ends."""
    received = []

    def handler(signum, frame):
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    yield handler, received
    for s, h in previous.items():
        signal.signal(s, h)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """``reproduce.py --preset smoke --minutes 3 --with-specialists mcl`` once for the whole session, in a scratch
    folder, on a synthetic tree (25 training and 5 test images a class), each stage held to one epoch whatever its
    box allows: every stage, the time box's plumbing and the specialists end to end. Its bundle is
    ``results/smoke/bundle/``, its published weights ``results/smoke/bundle/weights/``; ``(root, data)``."""
    import reproduce
    import utils.timebox

    root = tmp_path_factory.mktemp("smoke")
    data = write_tree(root / "cifar", per_class=(25, 5))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(utils.timebox, "choose_epochs", lambda *args, **kwargs: 1)
        reproduce.main([*SMOKE_FLAGS, "--data-dir", str(data), "--out", "results/smoke/bundle"])
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
    config.addinivalue_line("markers", "slow: an end-to-end check of minutes, left out unless asked for with "
                            "`pytest -m slow`")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    """Every test of the session's smoke pipeline is slow: the pipeline alone takes a minute and a half."""
    for item in items:
        if "smoke_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
