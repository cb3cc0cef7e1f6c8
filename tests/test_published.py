"""Every published bundle (``results/published/<gpu>-<date>/``, with a ``README.md`` saying how and where it was
made and the command's log ``reproduce.log`` beside it): small enough for git, made on a GPU, and its
``results.md`` the very figures that ``inference.py --bundle`` recomputes from its logits on the CPU, and the
figures that the README and docs/results.md quote from it as they stand there."""

import json
import re
from pathlib import Path

import pytest

import inference
import utils.trained
from tests.conftest import REPO
from utils.bundle import bundle_sizes

BESIDE = ("README.md", "reproduce.log", "preflight.log", "machine.txt")  # how and where it was made, its logs
PUBLISHED = sorted(p for p in (REPO / "results" / "published").glob("*") if (p / "results.json").exists())


@pytest.mark.parametrize("bundle", PUBLISHED, ids=[p.name for p in PUBLISHED])
def test_a_published_bundle_gives_its_own_tables_again_from_its_logits(bundle, tmp_path, monkeypatch):
    files, within = bundle_sizes(bundle, besides=BESIDE)
    assert within, files
    readme = bundle / "README.md"
    assert readme.exists() and "reproduce.py" in readme.read_text()
    results = json.loads((bundle / "results.json").read_text())
    assert not results["device"].startswith("CPU")  # nothing in results/published/ is produced on a CPU
    fitted = []  # the networks whose temperature is fitted: each once, for the ~40 policies fitted over them
    fit = utils.trained.fit_temperature
    monkeypatch.setattr(utils.trained, "fit_temperature", lambda logits, labels: fitted.append(logits) or
                        fit(logits, labels))
    inference.main(["--bundle", str(bundle), "--out", str(tmp_path)])
    classifiers = [n for n in results["networks"] if n["checkpoint"]["kind"] != "selector"]
    assert len(fitted) == len(classifiers)
    published, again = ([line for line in (folder / "results.md").read_text().splitlines()
                         if "re-analysed from the bundle" not in line] for folder in (bundle, tmp_path))
    assert again == published


def test_published_bundles_live_in_folders_named_by_gpu_and_date():
    for bundle in PUBLISHED:
        name = Path(bundle).name
        assert name.count("-") >= 3 and name[-10:-6].isdigit(), name  # e.g. h100-2026-11-28


def results_section(page):
    """The part of ``page`` that reports published runs: the README's Results section, or all of docs/results.md."""
    text = (REPO / page).read_text()
    return text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0] if page == "README.md" else text


@pytest.mark.parametrize("page", ["README.md", "docs/results.md"])
def test_every_figure_of_a_pages_results_tables_is_in_the_results_of_the_bundles_it_cites(page):
    section = results_section(page)
    cited = sorted({REPO / "results" / "published" / name
                    for name in re.findall(r"results/published/([\w.-]+)", section)})
    assert cited and all(bundle in PUBLISHED for bundle in cited)
    measured = "\n".join((bundle / "results.md").read_text() for bundle in cited)
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.endswith("---|")]
    cells = [cell.strip() for row in rows for cell in row.strip("|").split("|")[1:]]  # not the rows' names
    figures = [cell.replace("−", "-") if "[" in cell else cell.replace(",", "")  # 55,423 images/s: 55423 there
               for cell in cells if re.fullmatch(r"[-+−]?[\d,.]+%?( \[.*\])?", cell)]
    assert len(figures) > 20 and [f for f in figures if f not in measured] == []
