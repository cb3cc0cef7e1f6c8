"""Every command the README documents parses with its script's own parser, and the CPU walkthrough links up."""

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
README = (REPO / "README.md").read_text()


def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, re.S)


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


DOCUMENTED = [command for block in bash_blocks() for command in commands(block)]


def test_the_readme_documents_every_script():
    assert {script for script, _ in DOCUMENTED} == set(SCRIPTS)


@pytest.mark.parametrize("script,argv", DOCUMENTED, ids=[" ".join([s, *a])[:80] for s, a in DOCUMENTED])
def test_documented_command_parses(script, argv):
    """With the checks that run before any data is read; trainSelector's need the students' checkpoints."""
    module = SCRIPTS[script]
    if module in (trainSelector, evaluate):
        module.build_parser().parse_args(argv)
    else:
        module.parse_args(argv)


def test_the_test_command_is_what_ci_runs():
    assert "python -m pytest -q" in bash_blocks()[0]
    assert "python -m pytest -q" in (REPO / ".ci" / "run").read_text().splitlines()


def test_the_cpu_walkthrough_links_its_stages():
    (walkthrough,) = [block for block in bash_blocks() if "export CIFAR10_DIR" in block]
    steps = dict((" ".join([script, *argv[:2]]), argv) for script, argv in commands(walkthrough))
    teacher = teacherTrain.parse_args(steps["teacherTrain.py --name cpu"])
    students = StudentTrain.parse_args(steps["StudentTrain.py --model 1"]).members  # --model 1 2: both, in one loop
    selector = trainSelector.build_parser().parse_args(steps["trainSelector.py --name cpu"])
    results = inference.parse_args(steps["inference.py --name cpu"])
    assert all(s.teacher == teacher.checkpoint for s in students)
    assert [s.checkpoint for s in students] == default_students(selector.name) == results.students
    assert results.teacher == teacher.checkpoint and results.out.endswith("cpu")
    assert {(s.holdout, s.limit) for s in [teacher, *students]} == {(500, 300)}
