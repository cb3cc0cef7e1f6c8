"""Every command the README and docs/ document parses with its script's own parser, the CPU walkthrough links
up, the README stays short, and every relative link points at a file that exists."""

import re
import shlex

import pytest

import bench
import evaluate
import inference
import predict
import publish
import reproduce
import StudentTrain
import teacherTrain
import trainSelector
from tests.conftest import REPO
from utils.runs import default_students

SCRIPTS = {"teacherTrain.py": teacherTrain, "StudentTrain.py": StudentTrain, "trainSelector.py": trainSelector,
           "inference.py": inference, "predict.py": predict, "evaluate.py": evaluate, "reproduce.py": reproduce,
           "bench.py": bench, "publish.py": publish}
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]  # the README and every page of docs/
README_MAX_BYTES = 12_288  # what a reader takes in at a glance; the rest lives in docs/


def name(page):
    return str(page.relative_to(REPO))


def bash_blocks(page):
    return re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)


def commands(block):
    """``(script, argv)`` of each documented ``python X.py`` or ``torchrun ... X.py`` line, ``$F``-style
    variables set in the block expanded."""
    variables, found = {}, []
    for line in block.splitlines():
        line = line.split(" #")[0].strip()
        if match := re.fullmatch(r'(\w+)="(.*)"', line):
            variables[match[1]] = match[2]
            continue
        words = shlex.split(re.sub(r"\$(\w+)", lambda m: variables.get(m[1], m[0]), line))
        scripts = [i for i, word in enumerate(words) if word in SCRIPTS]
        if words[:1] in (["python"], ["torchrun"]) and scripts:
            found.append((words[scripts[0]], words[scripts[0] + 1:]))
    return found


DOCUMENTED = [(page, script, argv) for page in PAGES for block in bash_blocks(page)
              for script, argv in commands(block)]


def test_the_readme_and_docs_document_every_script():
    assert {script for _, script, _ in DOCUMENTED} == set(SCRIPTS)


@pytest.mark.parametrize("page,script,argv", DOCUMENTED,
                         ids=[f"{name(p)}: " + " ".join([s, *a])[:80] for p, s, a in DOCUMENTED])
def test_documented_command_parses(page, script, argv):
    """With the checks that run before any data is read; trainSelector's need the students' checkpoints, evaluate's
    its files, and ``--weights`` the published folder an earlier command of the page writes."""
    module = SCRIPTS[script]
    if module in (trainSelector, evaluate) or "--weights" in argv:
        module.build_parser().parse_args(argv)
    else:
        module.parse_args(argv)


def test_the_test_command_is_what_ci_runs():
    assert "python -m pytest -q" in bash_blocks(README)[0]
    assert "python -m pytest -q" in (REPO / ".ci" / "run").read_text().splitlines()


def test_the_cpu_walkthrough_links_its_stages():
    (walkthrough,) = [block for page in PAGES for block in bash_blocks(page) if "export CIFAR10_DIR" in block]
    steps = dict((" ".join([script, *argv[:2]]), argv) for script, argv in commands(walkthrough))
    teacher = teacherTrain.parse_args(steps["teacherTrain.py --name cpu"])
    students = StudentTrain.parse_args(steps["StudentTrain.py --model 1"]).members  # --model 1 2: both, in one loop
    selector = trainSelector.build_parser().parse_args(steps["trainSelector.py --name cpu"])
    results = inference.parse_args(steps["inference.py --name cpu"])
    assert all(s.teacher == teacher.checkpoint for s in students)
    assert [s.checkpoint for s in students] == default_students(selector.name) == results.students
    assert results.teacher == teacher.checkpoint and results.out.endswith("cpu")
    assert {(s.holdout, s.limit) for s in [teacher, *students]} == {(500, 300)}


def test_the_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes, over {README_MAX_BYTES:,}: move detail to docs/"


def relative_links(page):
    """The targets of ``[text](target)`` links (images too) that are neither web addresses nor anchors alone,
    without their ``#anchor``; code spans left out, so that ``[a](b)`` written as code is not a link."""
    text = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(), flags=re.S)
    targets = (match.split()[0] for match in re.findall(r"\]\(([^)\s]+(?:\s+\"[^\"]*\")?)\)", text))
    return [target.split("#")[0] for target in targets
            if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_relative_link_points_at_a_file(page):
    missing = [target for target in relative_links(page) if not (page.parent / target).exists()]
    assert not missing, f"{name(page)} links to what does not exist: {missing}"


def test_the_recipe_table_of_the_docs_is_the_one_the_recipes_print(capsys):
    from utils.recipes import main

    main([])
    printed = capsys.readouterr().out.splitlines()
    lines = (REPO / "docs" / "training.md").read_text().splitlines()
    start = lines.index(printed[0])
    assert lines[start:start + len(printed)] == printed
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m utils.recipes [-h]")
