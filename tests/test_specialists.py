"""Specialist students and the selectors that route them: the losses that make students differ on purpose, the
targets a selector learns, and the analyses that put a specialist pair beside the generalists.

The training tests use tiny stand-ins or a synthetic tree on the CPU; the analyses run on synthetic logits, where
what is planted is known.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import write_tree
from utils.analyses import analyse
from utils.distill import MultipleChoice, class_groups, group_loss, specialists
from utils.selector import selector_targets
from utils.trained import Networks, Trained

GROUPS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
SPLIT = {"holdout": 1000, "split_seed": 0, "limit": 0}


# ----------------------------------------------------------------------------- training specialists

def mcl_flags(**changes):
    return SimpleNamespace(**{"kd_loss": "kl", "temperature": 4.0, "alpha": 0.9, "label_smoothing": 0.0,
                              "spec_beta": 0.5, "spec_warmup": 0.0, **changes})


def test_mcl_gives_each_image_to_the_student_that_can_see_its_class():
    """Each student sees the features of half the classes only: the oracle assignment learns to send every image
    to the one that can tell its class."""
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (2000,))
    features = 3 * F.one_hot(labels, 10).float() + 0.3 * torch.randn(2000, 10)
    masks = [torch.zeros(10).index_fill_(0, torch.tensor(group), 1) for group in GROUPS]
    students = [torch.nn.Linear(10, 10) for _ in GROUPS]
    optimizers = [torch.optim.SGD(s.parameters(), lr=0.5) for s in students]
    coupling = MultipleChoice([mcl_flags(), mcl_flags()])
    teacher = 6 * F.one_hot(labels, 10).float()
    for step in range(300):
        batch = torch.randint(0, 2000, (128,))
        logits = [s(features[batch] * m) for s, m in zip(students, masks)]
        for optimizer, terms in zip(optimizers, coupling.losses(logits, labels[batch], teacher[batch], 1.0)):
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
    with torch.no_grad():
        logits = [s(features * m) for s, m in zip(students, masks)]
        loss = torch.stack([F.cross_entropy(logit, labels, reduction="none") for logit in logits])
        kd = torch.stack([F.kl_div(F.log_softmax(logit / 4, 1), F.softmax(teacher / 4, 1), reduction="none").sum(1)
                          for logit in logits])
        assigned = specialists(loss + kd, kd, 0.5).float()
    first_group = labels < 5
    assert assigned[0][first_group].mean() > 0.9 and assigned[1][~first_group].mean() > 0.9


def test_mcl_teaches_the_non_specialist_only_beta_times_its_kd_term_after_the_warm_up():
    logits = [torch.randn(8, 10, requires_grad=True) for _ in range(2)]
    labels, teacher = torch.arange(8) % 10, torch.randn(8, 10)
    coupling = MultipleChoice([mcl_flags(spec_warmup=0.5), mcl_flags(spec_warmup=0.5)])
    early, late = coupling.losses(logits, labels, teacher, 0.25), coupling.losses(logits, labels, teacher, 0.75)
    assert sum(t["assigned"].item() for t in late) == pytest.approx(1)  # every image has exactly one specialist
    for k in range(2):
        assert late[k]["loss"].item() < early[k]["loss"].item()  # the other's images count beta * KD only


def test_class_groups_put_the_classes_the_teacher_confuses_together():
    """Classes 0, 3, 5, 7, 9 are confused among themselves, as are 1, 2, 4, 6, 8: those are the groups."""
    first, second = [0, 3, 5, 7, 9], [1, 2, 4, 6, 8]
    pairs = [(a, a) for a in range(10) for _ in range(10)] + \
        [(a, b) for group in (first, second) for a in group for b in group if a != b for _ in range(2)]
    labels, predictions = torch.tensor(pairs).T
    assert class_groups(F.one_hot(predictions, 10).float(), labels, 2) == sorted([first, second])
    assert sorted(map(len, class_groups(F.one_hot(predictions, 10).float(), labels, 3))) == [3, 3, 4]


def test_a_groups_specialist_weighs_its_own_classes_up():
    flags = SimpleNamespace(kd_loss="kl", temperature=4.0, alpha=0.9, label_smoothing=0.0, spec_weight=4.0)
    loss_fn = group_loss(flags, GROUPS[0])
    logits, teacher = torch.randn(2, 10), torch.randn(2, 10)
    own, other = torch.tensor([0]), torch.tensor([9])
    both = loss_fn(torch.cat([logits[:1], logits[1:]]), torch.cat([own, other]), teacher)["loss"]
    alone = [loss_fn(logits[k:k + 1], label, teacher[k:k + 1])["loss"] for k, label in enumerate((own, other))]
    assert both.item() == pytest.approx((4 * alone[0].item() + alone[1].item()) / 5, rel=1e-5)


def test_the_selector_targets():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0]], [[0.0, 5.0], [0.0, 5.0]]])  # (N=2, S=2, C=2)
    labels = torch.tensor([0, 1])
    assert selector_targets(logits, labels, "right").tolist() == [[1, 0], [1, 1]]
    gain = selector_targets(logits, labels, "gain")
    assert gain[0, 0] == pytest.approx(torch.tensor([5.0, 0.0]).softmax(0)[0].item()) and gain[1, 0] > 0.99
    assert selector_targets(logits, labels, "assignment", torch.tensor([1, 0])).tolist() == [[0, 1], [1, 0]]


# ----------------------------------------------------------------------------- the analyses of a specialist pair

def logits_of(labels, accuracy, generator):
    """Logits right with probability ``accuracy`` per image (a tensor, one per image), confidently either way."""
    right = torch.rand(len(labels), generator=generator) < accuracy
    wrong = (labels + torch.randint(1, 10, labels.shape, generator=generator)) % 10
    predicted = torch.where(right, labels, wrong)
    return 4 * F.one_hot(predicted, 10).float() + torch.randn(len(labels), 10, generator=generator)


def trained(role, kind, arch, gflops, logits, **record):
    checkpoint = {"kind": kind, "arch": arch, "num_classes": 10, "split": SPLIT, "epoch": 1, "epochs": 1,
                  "complete": True, "kd": kind == "student" or None, "config": {"tta": "none"}, **record}
    return Trained(role, f"{role}.pt", checkpoint, 1, gflops * 1e9, logits)


def synthetic_networks(seed=0, planted=True, test_seed=None):
    """Teacher, two generalists (each right on 85% of the images, independently; their selector's scores noise) and,
    where ``planted``, two specialists (of GoogLeNet's cost) each right on 97% of its half of the classes and 60% of
    the other, with a selector that knows the halves. ``test_seed``: other test logits, the hold-out split's the
    same."""
    splits = {}
    for split, split_seed in (("holdout", seed), ("test", seed + 1 if test_seed is None else test_seed)):
        g = torch.Generator().manual_seed(split_seed)
        labels = torch.randint(0, 10, (1000,), generator=g)
        first = (labels < 5).float()
        splits[split] = {
            "labels": labels, "teacher": logits_of(labels, torch.full((1000,), 0.93), g),
            "student1": logits_of(labels, torch.full((1000,), 0.85), g),
            "student2": logits_of(labels, torch.full((1000,), 0.85), g),
            "selector": torch.randn(1000, 2, generator=g),
            "spec1": logits_of(labels, 0.6 + 0.37 * first, g), "spec2": logits_of(labels, 0.97 - 0.37 * first, g),
            "spec_selector": 3 * torch.stack([first, 1 - first], 1) + torch.randn(1000, 2, generator=g)}

    def logits(k):
        return {split: (s[k], s["labels"]) for split, s in splits.items()}

    cross_fit = {"folds": 2, "fold": (torch.arange(1000) % 2).tolist(), "epochs": [1, 1], "best_epochs": [1, 1]}
    networks = Networks(
        trained("Teacher", "teacher", "resnet50", 2.6, logits("teacher")),
        [trained("Student 1", "student", "densenet121", 1.78, logits("student1")),
         trained("Student 2", "student", "googlenet", 0.9, logits("student2"))], [],
        trained("Selector", "selector", "selector", 0.08, logits("selector"), cross_fit=cross_fit), None)
    if planted:
        method = {"specialist": {"method": "groups", "groups": GROUPS}}
        networks.specialists = [trained(f"Specialist {k}", "student", "googlenet", 0.9, logits(f"spec{k}"), **method)
                                for k in (1, 2)]
        networks.spec_selector = trained("Specialists' selector", "selector", "selector", 0.08,
                                         logits("spec_selector"), cross_fit={**cross_fit, "folds": 1})
    return networks


@pytest.fixture(scope="module")
def planted():
    return analyse(synthetic_networks(), "cascade", 1.25)[0]


def test_a_selector_of_planted_specialists_beats_random_routing_and_one_of_noise_does_not(planted):
    specialists_selector = planted["comparisons"]["spec:selector vs spec:random"]
    generalists_selector = planted["comparisons"]["selector vs random"]
    assert specialists_selector["low"] > 0.02
    assert generalists_selector["low"] <= 0 <= generalists_selector["high"]


def test_the_pairs_side_by_side_at_equal_cost_with_the_target(planted):
    pairs = planted["pairs"]
    assert pairs["best_student"] in ("student1", "student2")
    at_target = pairs["budgets"]["1.3"]
    assert set(at_target) == {"generalists", "spec:"} and at_target["spec:"]["policy"].startswith("spec:")
    assert at_target["spec:"]["gflops"] <= 1.3 * 0.9 + 1e-9
    assert at_target["spec:"]["vs_best_student"]["low"] > 0 and at_target["spec:"]["vs_generalists"]["difference"] > 0
    assert at_target["generalists"]["vs_generalists"] is None
    assert pairs["target"] == {"budget": 1.3, "points": 0.005, "met": True}
    assert set(planted["routing_share_per_class"]) == {"generalists", "spec:"}
    assert planted["labels"]["pair_students"]["spec:"] == ["specialist 1 (googlenet)", "specialist 2 (googlenet)"]
    assert planted["cross_fit"]["spec_selector"] is None  # one fold: scores out of sample, nothing to spread


def test_specialists_beside_the_generalists_change_none_of_the_generalists_figures(planted):
    alone = analyse(synthetic_networks(planted=False), "cascade", 1.25)[0]
    assert alone["pairs"]["target"] is None and "spec:routed" not in alone["accuracy"]
    for key in ("accuracy", "gflops", "comparisons", "budgets", "per_class", "random_routing", "rung_rules"):
        assert alone[key] == {k: v for k, v in planted[key].items() if k in alone[key]}, key
    assert alone["routed"] == planted["routed"]


def test_no_choice_of_the_analyses_reads_the_test_split(planted):
    """Other test logits (the same hold-out ones): every threshold, rung rule, best policy and best student chosen is
    the same."""
    other = analyse(synthetic_networks(test_seed=99), "cascade", 1.25)[0]
    assert other["accuracy"] != planted["accuracy"]
    assert other["routed"]["threshold"] == planted["routed"]["threshold"]
    assert other["rung_rules"] == planted["rung_rules"]
    assert other["pairs"]["best_student"] == planted["pairs"]["best_student"]
    for budget, row in planted["pairs"]["budgets"].items():
        assert {k: c["policy"] for k, c in row.items()} == {k: c["policy"] for k, c in other["pairs"]["budgets"][
            budget].items()}
    for key in ("systems", "within"):
        assert {p: c is None for p, c in planted["reach_teacher"][key].items()} == \
            {p: c is None for p, c in other["reach_teacher"][key].items()}


# ----------------------------------------------------------------------------- a selector learns an assignment

def groups_student(path, group, holdout):
    """A groups specialist checkpoint with untrained weights (a small network stands in for the student)."""
    from models import build_model
    from utils.checkpoint import clean_state_dict, save_checkpoint

    torch.manual_seed(len(group))
    save_checkpoint(path, {"kind": "student", "arch": "selector", "num_classes": 10,
                           "model": clean_state_dict(build_model("selector", 10)),
                           "split": {"holdout": holdout, "split_seed": 0, "limit": 0}, "complete": True,
                           "epoch": 1, "epochs": 1, "specialist": {"method": "groups", "group": group,
                                                                   "groups": GROUPS},
                           "config": {"translate": 4, "padding": "reflect", "tta": "none"}})
    return str(path)


def test_a_selector_learns_a_planted_class_group_assignment_from_the_training_split(tmp_path, capsys):
    """Every pixel of an image of class k is 20k + 10 (``write_tree``): the selector learns, from the training split,
    which half of the classes an image is of; its hold-out scores (images it never saw) say so, its control's do
    not."""
    import trainSelector
    from utils.checkpoint import load_checkpoint

    tree = write_tree(tmp_path / "cifar", per_class=(12, 1))
    students = [groups_student(tmp_path / f"s{k}.pt", group, holdout=40) for k, group in enumerate(GROUPS)]
    common = ["--students", *students, "--data-dir", str(tree), "--partial-data", "--device", "cpu", "--views", "0",
              "--epochs", "15", "--batch-size", "16", "--lr", "0.05"]
    trainSelector.main([*common, "--checkpoint", str(tmp_path / "selector.pt")])
    assert "each student's mean assignment target" in capsys.readouterr().out
    trainSelector.main([*common, "--shuffle-labels", "--checkpoint", str(tmp_path / "control.pt")])
    labels = None
    accuracy = {}
    for name in ("selector", "control"):
        checkpoint = load_checkpoint(tmp_path / f"{name}.pt", hint="", kind="selector")
        assert checkpoint["cross_fit"]["learned_from"] == "train" and checkpoint["config"]["target"] == "assignment"
        if labels is None:
            from utils.data import load_cifar10, make_splits
            from utils.split import Split

            _, labels = make_splits(load_cifar10(str(tree), allow_partial=True), Split.of(checkpoint))["holdout"]
        scores = checkpoint["holdout_logits"]
        accuracy[name] = (scores.argmax(1) == (labels >= 5).long()).float().mean().item()
    assert accuracy["selector"] > 0.9 and accuracy["control"] < accuracy["selector"] - 0.2
