"""Every flag a script accepts is acted on: read after the command line is parsed, by the script or the code it
calls. A flag that nothing reads changes neither what a run does nor what it records beyond its own value: it
misleads, and is refused here.

Each script runs once, end to end, on a tiny synthetic tree with small networks, its flags held in a
namespace that records every attribute read after argparse has filled it.
"""

import argparse
from collections import defaultdict

import pytest

import evaluate
import inference
import predict
import publish
import reproduce
import StudentTrain
import teacherTrain
import trainSelector
import utils.cli
import utils.weights
from tests.conftest import write_tree

READS = defaultdict(set)  # script -> the attributes read of its flags


class Reads(argparse.Namespace):
    """A namespace that records, in ``READS[script]``, every attribute read of it."""

    script = None

    def __getattribute__(self, name):
        if not name.startswith("_"):
            READS[type(self).script].add(name)
        return super().__getattribute__(name)


def recorded(monkeypatch, module, script):
    """Make ``module``'s command line parse into a recording namespace (its students' flags too)."""
    namespace = type("Recorded", (Reads,), {"script": script})
    parse = utils.cli.parse
    monkeypatch.setattr(module, "parse", lambda parser, argv=None: namespace(**vars(parse(parser, argv))))
    if hasattr(module, "Namespace"):
        monkeypatch.setattr(module, "Namespace", namespace)
    return module.build_parser()


def unread(parser, script):
    flags = {action.dest: max(action.option_strings, key=len) for action in parser._actions if action.option_strings}
    return sorted(flag for dest, flag in flags.items() if dest not in READS[script] and dest != "help")


pytestmark = pytest.mark.slow  # every script of the pipeline end to end: two minutes


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Every script of the pipeline run once with a non-default value of most of its flags."""
    root = tmp_path_factory.mktemp("flags")
    tree = write_tree(root / "cifar", per_class=(6, 2))
    data = ["--data-dir", str(tree), "--partial-data", "--device", "cpu"]
    split = ["--holdout", "20", "--split-seed", "1", "--limit", "40"]
    train = ["--epochs", "1", "--batch-size", "5", "--lr", "0.05", "--schedule", "linear", "--warmup-epochs", "0",
             "--momentum", "0.8", "--weight-decay", "0.0001", "--ema", "0.5", "--tta", "flip", "--eval-every", "2",
             "--save-every", "0", "--log-every", "1", "--seed", "1", "--time-budget", "100", "--name", "f"]
    augment = ["--label-smoothing", "0.05", "--translate", "2", "--padding", "zeros", "--cutout", "4", "--mix",
               "mixup", "--mix-alpha", "0.5", "--mix-prob", "0.5"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        parsers = {}
        parsers["teacherTrain.py"] = recorded(patch, teacherTrain, "teacherTrain.py")
        teacherTrain.main([*data, *split, *train, *augment, "--arch", "resnet18"])
        teacherTrain.main([*data, *split, *train, *augment, "--arch", "resnet18", "--epochs", "2", "--force"])
        parsers["StudentTrain.py"] = recorded(patch, StudentTrain, "StudentTrain.py")
        StudentTrain.main([*data, *split, *train, *augment, "--model", "googlenet", "resnet18", "--with-nokd",
                           "--kd-loss", "kl", "--temperature", "2", "--alpha", "0.5"])
        specialists = [*data, *split, *train, "--model", "googlenet", "resnet18", "--epochs", "1"]
        StudentTrain.main([*specialists, "--specialise", "mcl", "--spec-beta", "0.3", "--spec-warmup", "0.5"])
        StudentTrain.main([*specialists, "--specialise", "groups", "--spec-weight", "2"])
        students = ["--students", "checkpoints/f/student_googlenet.pt", "checkpoints/f/student_resnet18.pt"]
        selector = [*data, *students, *train, "--views", "1", "--folds", "2", "--val-fraction", "0.3"]
        parsers["trainSelector.py"] = recorded(patch, trainSelector, "trainSelector.py")
        trainSelector.main([*selector, "--disagreement-only", "--batch-size", "1", "--fold-epochs", "1", "1"])
        trainSelector.main([*selector, "--shuffle-labels", "--epochs", "2"])
        parsers["inference.py"] = recorded(patch, inference, "inference.py")
        inference.main([*data, *students, "--name", "f", "--router", "deferral", "--budget", "1.5",
                        "--batch-size", "7", "--timed-passes", "1", "--out", "results/f"])
        inference.main(["--bundle", "results/f", "--out", "results/again"])
        parsers["evaluate.py"] = recorded(patch, evaluate, "evaluate.py")
        evaluate.main([*data, "checkpoints/f/teacher.pt", "--split", "holdout", "--out", "evaluation.json"])
        image = root / "cat.png"
        tree.joinpath("test", "cat", "0000.png").rename(image)
        for cache in root.glob("checkpoints/f/*.logits.pt"):  # predict.py reads the data only to make them
            cache.unlink()
        parsers["predict.py"] = recorded(patch, predict, "predict.py")
        predict.main([str(image), *data, *students, "--name", "f", "--selector", "checkpoints/f/selector.pt",
                      "--router", "cascade", "--budget", "2"])
        parsers["publish.py"] = recorded(patch, publish, "publish.py")
        patch.setattr(utils.weights, "MAX_FILE_BYTES", 2**30)  # a ResNet18 student is over a published file's size
        publish.main([*data, *students, "--name", "f", "--selector", "checkpoints/f/selector.pt", "--with-teacher",
                      "--teacher", "checkpoints/f/teacher.pt", "--out", "results/f/weights", "--batch-size", "7"])
        publish.main([*data, *students, "--name", "f", "--out", "results/f/weights", "--force"])
        parsers["reproduce.py"] = pipeline_runs(patch, data, root)
    return parsers


def pipeline_runs(patch, data, root):
    """reproduce.py three times (its flags exclude each other in pairs), every stage's script a no-op."""
    import utils.pipeline

    parser = recorded(patch, reproduce, "reproduce.py")
    for module in (teacherTrain, StudentTrain, trainSelector, inference, publish):
        patch.setattr(module, "main", lambda argv: None)
    patch.setattr(utils.pipeline, "finish_bundle", lambda *args: None)
    patch.setattr(utils.pipeline, "summarise", lambda *args: None)
    common = ["--preset", "smoke", "--name", "r", "--kd-loss", "mse", "--with-nokd", "--time-budget", "5", *data]
    reproduce.main([*common, "--seeds", "0", "1", "--epochs", "1", "--force"])
    reproduce.main([*common, "--seed", "3", "--minutes", "2", "--download"])
    reproduce.main([*common, "--epochs-from", str(root / "results" / "f")])
    return parser


@pytest.mark.parametrize("script", ["teacherTrain.py", "StudentTrain.py", "trainSelector.py", "inference.py",
                                    "evaluate.py", "predict.py", "publish.py", "reproduce.py"])
def test_every_flag_of_a_pipeline_script_is_acted_on(experiment, script):
    assert unread(experiment[script], script) == []
