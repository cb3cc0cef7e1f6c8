"""Routing policies on synthetic student outputs whose best routing is known."""

import pytest
import torch
import torch.nn.functional as F

from utils.plots import plot_accuracy_vs_flops
from utils.routers import (
    ROUTERS,
    CascadeRouter,
    DeferralRouter,
    EnsembleRouter,
    RandomRouter,
    SelectorRouter,
    SingleStudentRouter,
    StudentOutputs,
    build_router,
    fit_temperature,
    oracle_routing,
    selector_targets,
    shuffled_labels,
    students_disagree,
    threshold_curve,
)

FLOPS = (1.777, 2.902)  # DenseNet121 and GoogLeNet, GFLOPs per 32x32 image
SELECTOR_FLOPS = 0.077
CLASSES = 10


def one_hot(classes):
    return F.one_hot(classes, CLASSES).float()


def easy_and_hard(n, seed, hard_share=0.3):
    """Student 1 is sure and right on easy images, unsure and mostly wrong on hard ones. Student 2
    is right on hard images, but confidently wrong on 40% of the easy ones. The best system runs
    student 2 on the hard images only: a confidence cascade with the right threshold."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=g)
    wrong = (labels + torch.randint(1, CLASSES, (n,), generator=g)) % CLASSES
    hard = torch.rand(n, generator=g) < hard_share
    second_wrong = ~hard & (torch.rand(n, generator=g) < 0.4)
    first = torch.where(hard[:, None], one_hot(wrong), 4 * one_hot(labels))
    second = torch.where(second_wrong[:, None], 8 * one_hot(wrong), 5 * one_hot(labels))
    logits = torch.stack([first, second], 1) + torch.randn(n, 2, CLASSES, generator=g)
    return StudentOutputs(logits), labels


def complementary(n, seed, informative=True):
    """Two students right on different images (75% and 70%, independently), and a selector that
    has learned "is student k right" from the true labels or, as a control, from shuffled ones."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=g)
    wrong = (labels[:, None] + torch.randint(1, CLASSES, (n, 2), generator=g)) % CLASSES
    right = torch.rand(n, 2, generator=g) < torch.tensor([0.75, 0.70])
    logits = 3 * one_hot(torch.where(right, labels[:, None], wrong)) + torch.randn(n, 2, CLASSES, generator=g)
    targets = selector_targets(logits, labels if informative else shuffled_labels(labels, seed))
    scores = 2 * (2 * targets - 1) + 1.5 * torch.randn(n, 2, generator=g)
    return StudentOutputs(logits, scores), labels


@pytest.fixture(scope="module")
def easy_hard():
    return easy_and_hard(4000, seed=0), easy_and_hard(4000, seed=1)


def single(k, holdout):
    return SingleStudentRouter(FLOPS, k).fit(*holdout).route(holdout[0])


def test_only_a_fitted_cascade_threshold_beats_both_students(easy_hard):
    holdout, (test, labels) = easy_hard
    students = [SingleStudentRouter(FLOPS, k).fit(*holdout).route(test).accuracy(labels) for k in range(2)]
    ensemble = EnsembleRouter(FLOPS).fit(*holdout).route(test)
    cascade = CascadeRouter(FLOPS).fit(*holdout).route(test)
    assert cascade.accuracy(labels) > max(students) + 0.1
    assert cascade.accuracy(labels) > ensemble.accuracy(labels) + 0.03
    assert cascade.share[1].item() == pytest.approx(0.3, abs=0.05)  # student 2 on about the hard images
    assert cascade.gflops < ensemble.gflops
    curve = CascadeRouter(FLOPS).fit(*holdout).curve(test, labels)
    assert curve.accuracy[0].item() == pytest.approx(students[0])  # never escalate: student 1
    assert curve.accuracy[-1].item() == pytest.approx(ensemble.accuracy(labels))  # always: the ensemble


@pytest.mark.parametrize("measure", ["maxprob", "margin", "entropy"])
@pytest.mark.parametrize("budget", [1.1, 1.25, 1.5])
def test_cascade_respects_the_budget_on_holdout(easy_hard, measure, budget):
    (holdout, holdout_labels), (test, labels) = easy_hard
    router = CascadeRouter(FLOPS, measure=measure).fit(holdout, holdout_labels, budget)
    assert router.route(holdout).gflops <= budget * FLOPS[0] + 1e-9
    assert router.route(test).gflops == pytest.approx(router.route(holdout).gflops, rel=0.03)
    assert router.route(test).accuracy(labels) > single(0, (test, labels)).accuracy(labels) + 0.05


@pytest.mark.parametrize("name", ["cascade", "deferral"])
def test_a_budget_of_the_cheaper_student_runs_it_alone(easy_hard, name):
    holdout, (test, labels) = easy_hard
    routing = build_router(name, flops=FLOPS).fit(*holdout, budget=1.0).route(test)
    assert not routing.ran[:, 1].any() and routing.gflops == pytest.approx(FLOPS[0])
    assert torch.equal(routing.prediction, single(0, (test, labels)).prediction)


def test_the_threshold_comes_from_the_holdout_split_only(easy_hard):
    (holdout, holdout_labels), (test, labels) = easy_hard
    router = CascadeRouter(FLOPS).fit(holdout, holdout_labels, budget=1.25)
    threshold, routing = router.threshold_, router.route(test)
    router.curve(test, shuffled_labels(labels))
    assert router.threshold_ == threshold and torch.equal(router.route(test).ran, routing.ran)
    assert CascadeRouter(FLOPS).fit(holdout, shuffled_labels(holdout_labels), budget=1.25).threshold_ != threshold


def test_threshold_curve_on_a_hand_computed_case():
    score = torch.tensor([0.9, 0.1, 0.5, 0.5])
    keep = torch.tensor([True, False, False, True])
    switch = torch.tensor([False, True, True, True])
    curve = threshold_curve(score, keep, switch, gflops_keep=1.0, gflops_switch=3.0)
    assert curve.thresholds.tolist() == [float("inf"), pytest.approx(0.7), pytest.approx(0.3), float("-inf")]
    assert curve.accuracy.tolist() == [0.5, 0.25, 0.5, 0.75]  # the two scores of 0.5 switch together
    assert curve.switched.tolist() == [0.0, 0.25, 0.75, 1.0] and curve.gflops.tolist() == [1.0, 1.5, 2.5, 3.0]
    assert curve.best() == 3 and curve.best(max_gflops=2.5) == 0  # a tie goes to the cheaper
    assert curve.best(max_gflops=0.5) is None


def test_temperature_fit_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    calibrated = 1.5 * torch.randn(20000, CLASSES, generator=g)
    labels = torch.multinomial(calibrated.softmax(1), 1, generator=g).squeeze(1)
    temperature = fit_temperature(torch.stack([0.5 * calibrated, 3 * calibrated], 1), labels)
    assert temperature.tolist() == [pytest.approx(0.5, rel=0.1), pytest.approx(3.0, rel=0.1)]


def test_deferral_beats_the_first_student(easy_hard):
    holdout, (test, labels) = easy_hard
    deferral = DeferralRouter(FLOPS).fit(*holdout, budget=1.5).route(test)
    assert deferral.accuracy(labels) > single(0, (test, labels)).accuracy(labels) + 0.1


def test_deferral_defers_where_it_helps_not_where_the_first_student_is_least_sure():
    def fixable_and_hopeless(n, seed):
        """Student 1 is right on 60% of the images; torn between a wrong class and the right one on
        20% (student 2 fixes these); at a loss on the last 20% (where student 2 is wrong too)."""
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(CLASSES, (n,), generator=g)
        wrong = (labels + torch.randint(1, CLASSES, (n,), generator=g)) % CLASSES
        kind = torch.multinomial(torch.tensor([0.6, 0.2, 0.2]), n, replacement=True, generator=g)
        easy, hopeless = kind == 0, kind == 2
        first = torch.where(easy[:, None], 5 * one_hot(labels), 2.5 * one_hot(wrong) + 2 * one_hot(labels))
        first = torch.where(hopeless[:, None], torch.zeros(n, CLASSES), first)
        second = 5 * one_hot(torch.where(hopeless, wrong, labels))
        return StudentOutputs(torch.stack([first, second], 1) + 0.5 * torch.randn(n, 2, CLASSES, generator=g)), labels

    holdout, (test, labels) = fixable_and_hopeless(4000, 0), fixable_and_hopeless(4000, 1)
    cascade = CascadeRouter(FLOPS).fit(*holdout, budget=1.33).route(test)
    deferral = DeferralRouter(FLOPS).fit(*holdout, budget=1.33).route(test)
    assert deferral.accuracy(labels) > cascade.accuracy(labels) + 0.1
    assert deferral.share[1].item() == pytest.approx(0.2, abs=0.03)


def test_deferral_learns_from_the_selector_what_confidence_cannot_tell():
    def overconfident(n, seed):
        """Student 1 is as sure when wrong (hard images) as when right; the selector knows which is which."""
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(CLASSES, (n,), generator=g)
        hard = torch.rand(n, generator=g) < 0.3
        wrong = (labels + torch.randint(1, CLASSES, (n,), generator=g)) % CLASSES
        first = 4 * one_hot(torch.where(hard, wrong, labels))
        logits = torch.stack([first, 4 * one_hot(labels)], 1) + torch.randn(n, 2, CLASSES, generator=g)
        scores = torch.stack([torch.where(hard, -2.0, 2.0), torch.full((n,), 2.0)], 1) + torch.randn(n, 2, generator=g)
        return StudentOutputs(logits, scores), labels

    holdout, (test, labels) = overconfident(3000, 0), overconfident(3000, 1)
    cascade = CascadeRouter(FLOPS).fit(*holdout, budget=1.5).route(test)
    deferral = DeferralRouter(FLOPS, router_flops=SELECTOR_FLOPS, use_selector=True).fit(*holdout, budget=1.5)
    routed = deferral.route(test)
    assert routed.accuracy(labels) > cascade.accuracy(labels) + 0.15
    assert routed.gflops == pytest.approx(SELECTOR_FLOPS + FLOPS[0] + routed.share[1].item() * FLOPS[1])


def test_shares_sum_to_one_and_set_the_expected_gflops():
    holdout, (test, _) = complementary(3000, 0), complementary(3000, 1)
    selector = SelectorRouter(FLOPS, SELECTOR_FLOPS).fit(*holdout, budget=1.5).route(test)
    random = RandomRouter(FLOPS, selector.share.tolist()).fit(*holdout).route(test)
    for routing, router_flops in ((selector, SELECTOR_FLOPS), (random, 0.0)):
        assert (routing.ran.sum(1) == 1).all() and routing.share.sum().item() == pytest.approx(1.0)
        share = routing.share.tolist()
        assert routing.gflops == pytest.approx(router_flops + share[0] * FLOPS[0] + share[1] * FLOPS[1])
    assert torch.equal(random.share, selector.share)
    cascade = CascadeRouter(FLOPS).fit(*holdout).route(test)
    assert cascade.share[0].item() == 1.0
    assert cascade.gflops == pytest.approx(FLOPS[0] + cascade.share[1].item() * FLOPS[1])


@pytest.mark.parametrize("informative", [True, False])
def test_selector_beats_random_routing_only_when_its_scores_are_informative(informative):
    holdout = complementary(3000, 0, informative)
    test, labels = complementary(3000, 1, informative)
    selector = SelectorRouter(FLOPS, SELECTOR_FLOPS).fit(*holdout, budget=1.25).route(test)
    random = RandomRouter(FLOPS, selector.share.tolist(), seed=0).fit(*holdout).route(test)
    gain = selector.accuracy(labels) - random.accuracy(labels)
    curve = SelectorRouter(FLOPS, SELECTOR_FLOPS).fit(*holdout).curve(test, labels)
    first, second = (single(k, (test, labels)).accuracy(labels) for k in range(2))
    gain_over_random = curve.accuracy - ((1 - curve.switched) * first + curve.switched * second)
    if informative:
        assert gain > 0.15 and gain_over_random.max() > 0.15
    else:
        assert abs(gain) < 0.02 and gain_over_random.abs().max() < 0.03


def test_random_routing_is_exact_and_seeded():
    outputs, labels = complementary(1000, 0)
    router = RandomRouter(FLOPS, (0.3, 0.7), seed=1).fit(outputs, labels)
    assert router.route(outputs).share.tolist() == [0.3, 0.7]
    assert torch.equal(router.route(outputs).ran, router.route(outputs).ran)
    assert not torch.equal(RandomRouter(FLOPS, (0.3, 0.7), seed=2).fit(outputs, labels).route(outputs).ran,
                           router.route(outputs).ran)
    with pytest.raises(ValueError):
        RandomRouter(FLOPS, (0.3, 0.6))


def test_oracle_bounds_every_system_at_the_cost_of_all_students(easy_hard):
    holdout, (test, labels) = easy_hard
    oracle = oracle_routing(test, labels, FLOPS)
    assert oracle.gflops == pytest.approx(sum(FLOPS))
    assert oracle.accuracy(labels) == (test.logits.argmax(-1) == labels[:, None]).any(1).double().mean().item()
    for router in (CascadeRouter(FLOPS), DeferralRouter(FLOPS), EnsembleRouter(FLOPS), SingleStudentRouter(FLOPS, 1)):
        assert router.fit(*holdout).route(test).accuracy(labels) <= oracle.accuracy(labels)
    ensemble = EnsembleRouter(FLOPS).fit(*holdout).route(test)
    assert ensemble.share.tolist() == [1.0, 1.0] and ensemble.gflops == pytest.approx(sum(FLOPS))


def test_selector_targets_and_disagreement():
    logits = one_hot(torch.tensor([[0, 0], [0, 1], [2, 1], [3, 3]]))
    labels = torch.tensor([0, 1, 1, 0])
    assert selector_targets(logits, labels).tolist() == [[1, 1], [0, 1], [0, 1], [0, 0]]
    assert students_disagree(logits, labels).tolist() == [False, True, True, False]


def test_shuffled_labels_permute_the_labels():
    labels = torch.arange(100) % CLASSES
    shuffled = shuffled_labels(labels, seed=3)
    assert torch.equal(shuffled.sort().values, labels.sort().values) and not torch.equal(shuffled, labels)
    assert torch.equal(shuffled, shuffled_labels(labels, seed=3))


def test_registry_and_clear_refusals(easy_hard):
    (holdout, labels), _ = easy_hard
    for name in ROUTERS:
        assert build_router(name, flops=FLOPS).name == name
    with pytest.raises(ValueError, match="cascade, deferral, selector"):
        build_router("bandit", flops=FLOPS)
    with pytest.raises(ValueError, match="selector's scores"):
        SelectorRouter(FLOPS, SELECTOR_FLOPS).fit(holdout, labels)
    outputs = StudentOutputs(holdout.logits, torch.zeros(len(labels), 2))
    with pytest.raises(ValueError, match="no selector threshold"):
        SelectorRouter(FLOPS, SELECTOR_FLOPS).fit(outputs, labels, budget=1.0)  # the selector alone exceeds it
    with pytest.raises(ValueError, match="uncertainty measure"):
        CascadeRouter(FLOPS, measure="variance")
    with pytest.raises(ValueError):
        StudentOutputs(holdout.logits[:, 0])


def test_accuracy_vs_flops_plot(easy_hard, tmp_path):
    holdout, (test, labels) = easy_hard
    curve = CascadeRouter(FLOPS).fit(*holdout).curve(test, labels)
    points = {"student 1": (FLOPS[0], 0.7), "oracle": (sum(FLOPS), 0.95)}
    plot_accuracy_vs_flops({"cascade": (curve.gflops, curve.accuracy)}, points, tmp_path / "a.png", "test")
    assert (tmp_path / "a.png").stat().st_size > 0


class Scored:
    """A stand-in for a trained ``Network``: its GFLOPs and its logits on the hold-out and test splits."""

    def __init__(self, gflops, logits, labels):
        self.gflops, self.logits = gflops, {"holdout": (logits, labels), "test": (logits, labels)}


@pytest.mark.parametrize("name", ["cascade", "deferral"])
def test_a_router_runs_the_cheapest_student_first_in_whichever_order_they_are_listed(easy_hard, name):
    from utils.routing import fit_router

    (holdout, labels), _ = easy_hard
    cheap, dear = (Scored(gflops, holdout.logits[:, k], labels) for k, gflops in enumerate((0.9, 1.8)))
    for students in ([cheap, dear], [dear, cheap]):
        router = fit_router(name, 1.0, students, None)
        assert students[router.order[0]] is cheap and router.flops[router.order[0]] == 0.9
        routing = router.route(StudentOutputs(torch.stack([s.logits["holdout"][0] for s in students], 1)))
        assert routing.ran[:, router.order[0]].all() and not routing.ran[:, router.order[1]].any()
        assert routing.gflops == pytest.approx(0.9)  # a budget of 1x the cheapest: it alone
