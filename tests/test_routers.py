"""Routing policies on synthetic student outputs whose best routing is known."""

import pytest
import torch
import torch.nn.functional as F

from utils.data import stratified_folds
from utils.plots import plot_accuracy_vs_flops
from utils.choices import ROUTERS
from utils.policies import (
    POLICIES,
    RANDOM_DRAWS,
    CascadeRouter,
    DeferralRouter,
    EnsembleRouter,
    NoThresholdError,
    RandomRouter,
    SelectorRouter,
    SingleRouter,
    StudentOutputs,
    build_router,
    cost_envelope,
    fit_softmax_regression,
    fit_temperature,
    ladder_curve,
    oracle_routing,
)
from utils.routed import Ladder, budget_refusal, fit_policy
from utils.selector import out_of_fold, selector_targets, shuffled_labels, students_disagree
from utils.stats import paired_bootstrap
from utils.trained import Trained

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
    return SingleRouter(FLOPS, order=(k,)).fit(*holdout).route(holdout[0])


def test_only_a_fitted_cascade_threshold_beats_both_students(easy_hard):
    holdout, (test, labels) = easy_hard
    students = [SingleRouter(FLOPS, order=(k,)).fit(*holdout).route(test).accuracy(labels) for k in range(2)]
    ensemble = EnsembleRouter(FLOPS).fit(*holdout).route(test)
    cascade = CascadeRouter(FLOPS).fit(*holdout).route(test)
    assert cascade.accuracy(labels) > max(students) + 0.1
    assert cascade.accuracy(labels) > ensemble.accuracy(labels) + 0.03
    assert cascade.share[1].item() == pytest.approx(0.3, abs=0.07)  # student 2 on about the hard images
    assert CascadeRouter(FLOPS).fit(*holdout).rule_ == "last"  # where student 1 is unsure, student 2 alone is right
    assert cascade.gflops < ensemble.gflops
    curve = CascadeRouter(FLOPS).fit(*holdout).curve(test, labels)
    assert curve.accuracy[0].item() == pytest.approx(students[0])  # never escalate: student 1
    assert curve.accuracy[-1].item() == pytest.approx(single(1, (test, labels)).accuracy(labels))  # always: student 2


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
    curve = ladder_curve(score[:, None], torch.stack([keep, switch], 1), torch.tensor([[1.0, 3.0]]).expand(4, 2))
    # each threshold is the largest score not switched, in the scores' own dtype
    assert curve.thresholds.tolist() == [float("inf"), 0.5, torch.tensor(0.1).item(), float("-inf")]
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
    for router in (CascadeRouter(FLOPS), DeferralRouter(FLOPS), EnsembleRouter(FLOPS), SingleRouter(FLOPS, order=(1,))):
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
    assert set(ROUTERS) <= set(POLICIES)
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
    plot_accuracy_vs_flops({"": ({"cascade": (curve.gflops, curve.accuracy)}, points)}, tmp_path / "a.png", "test")
    assert (tmp_path / "a.png").stat().st_size > 0


def Scored(gflops, logits, labels):
    """A stand-in for a trained ``Network``: its GFLOPs and its logits on the hold-out and test splits."""
    return Trained("", f"network of {gflops} GFLOPs", {}, flops=gflops * 1e9,
                   logits={"holdout": (logits, labels), "test": (logits, labels)})


@pytest.mark.parametrize("name", ["cascade", "deferral"])
def test_a_router_runs_the_cheapest_student_first_in_whichever_order_they_are_listed(easy_hard, name):
    (holdout, labels), _ = easy_hard
    cheap, dear = (Scored(gflops, holdout.logits[:, k], labels) for k, gflops in enumerate((0.9, 1.8)))
    for students in ([cheap, dear], [dear, cheap]):
        router = fit_policy(name, Ladder(students), budget=1.0)
        assert students[router.order[0]] is cheap and router.flops[router.order[0]] == 0.9
        routing = router.route(StudentOutputs(torch.stack([s.logits["holdout"][0] for s in students], 1)))
        assert routing.ran[:, router.order[0]].all() and not routing.ran[:, router.order[1]].any()
        assert routing.gflops == pytest.approx(0.9)  # a budget of 1x the cheapest: it alone


# ----------------------------------------------------------------------------- route as the curve counts

def test_route_sends_exactly_the_images_the_curve_counts_at_every_threshold():
    """float32 scores one ulp apart: a float64 midpoint between them rounds onto one of them in float32, and an
    image the curve counted as switched stayed put. Every threshold is now one of the scores themselves."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(CLASSES, generator=g)
    first = base + 1e-5 * torch.randn(4999, CLASSES, generator=g)  # maxprob uncertainties a few ulps apart
    logits = torch.stack([first, torch.randn(4999, CLASSES, generator=g)], 1)
    outputs, labels = StudentOutputs(logits), torch.randint(CLASSES, (4999,), generator=g)
    router = CascadeRouter(FLOPS).fit(outputs, labels)
    scores = router.climbs(outputs)[:, 0]
    assert scores.dtype == torch.float32 and len(scores.unique()) < 200  # ties and neighbours in plenty
    curve = router.curve(outputs, labels)
    for threshold, switched, accuracy, gflops in zip(curve.thresholds.tolist(), curve.switched, curve.accuracy,
                                                     curve.gflops):
        router.threshold_ = threshold
        routing = router.route(outputs)
        assert routing.ran[:, 1].sum().item() == round(switched.item() * 4999)
        assert routing.correct(labels).sum().item() == round(accuracy.item() * 4999)
        assert routing.gflops == pytest.approx(gflops.item(), abs=1e-12)


# ----------------------------------------------------------------------------- budgets and the errors fit may raise

def test_only_a_missed_budget_is_a_missed_budget_a_shape_or_count_mismatch_is_not():
    outputs, labels = complementary(500, 0)
    students = [Scored(gflops, outputs.logits[:, k], labels) for k, gflops in enumerate((0.9, 1.8))]
    selector = Scored(SELECTOR_FLOPS, outputs.selector_scores, labels)
    with pytest.raises(NoThresholdError):  # the selector alone exceeds 1x: no threshold
        fit_policy("selector", Ladder(students, selector), budget=1.0)
    for width in (1, 3):  # a selector trained for other students
        wrong = Scored(SELECTOR_FLOPS, torch.zeros(len(labels), width), labels)
        with pytest.raises(ValueError, match="selector_scores must be") as mismatch:
            fit_policy("selector", Ladder(students, wrong), budget=1.5)
        assert not isinstance(mismatch.value, NoThresholdError)
    flat = [Scored(0.9, outputs.logits[:, 0, 0], labels), Scored(1.8, outputs.logits[:, 1, 0], labels)]
    with pytest.raises(ValueError, match="logits must be") as mismatch:
        fit_policy("cascade", Ladder(flat), budget=1.5)
    assert not isinstance(mismatch.value, NoThresholdError)


def test_a_budget_below_the_cheapest_system_is_refused_naming_the_least_that_fits():
    outputs, labels = complementary(500, 0)
    students = [Scored(gflops, outputs.logits[:, k], labels) for k, gflops in enumerate((0.9, 1.8))]
    selector = Scored(0.077, outputs.selector_scores, labels)
    with pytest.raises(NoThresholdError) as missed:
        fit_policy("selector", Ladder(students, selector), budget=1.0)
    message = str(budget_refusal("selector", 1.0, missed.value))
    assert "\n" not in message and message.startswith("--budget 1 is below the cheapest selector system")
    assert message.endswith("give --budget 1.09 or more")  # (0.9 + 0.077) / 0.9 = 1.0856
    assert fit_policy("selector", Ladder(students, selector), budget=1.09).route(outputs).gflops <= 1.09 * 0.9
    assert fit_policy("cascade", Ladder(students), budget=1.0).route(outputs).gflops == pytest.approx(0.9)


def test_a_router_fitted_once_gives_the_threshold_of_each_budget_a_fit_for_it_gives():
    (holdout, labels), (test, _) = easy_and_hard(2000, 0), easy_and_hard(2000, 1)
    fitted = DeferralRouter(FLOPS).fit(holdout, labels)
    for budget in (1.0, 1.1, 1.3):
        again = DeferralRouter(FLOPS).fit(holdout, labels, budget=budget)
        assert fitted.at(budget=budget).threshold_ == again.threshold_
        assert torch.equal(fitted.at(budget=budget).route(test).ran, again.route(test).ran)
    assert fitted.at(budget=1.0).threshold_ != fitted.threshold_  # a copy: the fitted router keeps its own
    with pytest.raises(NoThresholdError):
        fitted.at(accuracy=1.01)


# ----------------------------------------------------------------------------- learned deferral: help and hurt

def helps_or_hurts(n, seed):
    """Easy images (50%): student 1 sure and right. Coin flips (25%): student 1 leans to one class, right on half
    of them, and student 2 is sure of the other answer: averaging it in helps on half, hurts on the other half,
    gains nothing. Fixable (25%): student 1 torn between two classes, wrong on 40%, and student 2 sure and right:
    averaging it in helps on 40% and never hurts."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=g)
    wrong = (labels[:, None] + torch.randint(1, CLASSES, (n, 2), generator=g)) % CLASSES
    kind = torch.multinomial(torch.tensor([0.5, 0.25, 0.25]), n, replacement=True, generator=g)
    first_right = torch.rand(n, generator=g) < torch.tensor([1.0, 0.5, 0.6])[kind]
    first_class = torch.where(first_right, labels, wrong[:, 0])
    other_class = torch.where(first_right, wrong[:, 0], labels)
    first = torch.stack([5 * one_hot(labels), 2.5 * one_hot(first_class),
                         1.5 * one_hot(first_class) + 1.2 * one_hot(other_class)])[kind, torch.arange(n)]
    second = 6 * one_hot(torch.where((kind == 1) & first_right, wrong[:, 1], labels))
    logits = torch.stack([first, second], 1) + 0.3 * torch.randn(n, 2, CLASSES, generator=g)
    return StudentOutputs(logits), labels, kind


def test_deferral_defers_where_deferring_gains_not_where_it_helps_as_often_as_it_hurts():
    holdout, holdout_labels, _ = helps_or_hurts(6000, 0)
    test, labels, kind = helps_or_hurts(6000, 1)
    deferral = DeferralRouter(FLOPS).fit(holdout, holdout_labels, budget=1.41).route(test)  # room for ~25%
    deferred = deferral.ran[:, 1]
    assert deferred[kind == 2].double().mean() > 0.9 and deferred[kind == 1].double().mean() < 0.1
    first = single(0, (test, labels)).accuracy(labels)
    assert deferral.accuracy(labels) > first + 0.08


# ----------------------------------------------------------------------------- three networks and more

def test_the_cost_envelope_moves_each_image_to_dearer_students_as_the_threshold_falls():
    right = torch.tensor([[0.5, 0.8, 0.9], [0.5, 0.6, 0.9], [0.9, 0.5, 0.6]], dtype=torch.float64)
    students, climbs = cost_envelope(right, torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    assert students.tolist() == [[0, 1, 2], [0, 2, 2], [0, 2, 2]]  # the second skips student 2
    assert climbs[0].tolist() == [pytest.approx(0.3), pytest.approx(0.05)]
    assert climbs[1].tolist() == [pytest.approx(0.4 / 3), float("-inf")]
    assert climbs[2].tolist() == [pytest.approx(-0.1), float("-inf")]  # the cheapest is surest: dearer only below 0


def three_students(n, seed):
    """Three students right on different images, and a selector that knows which (like ``complementary``)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=g)
    wrong = (labels[:, None] + torch.randint(1, CLASSES, (n, 3), generator=g)) % CLASSES
    right = torch.rand(n, 3, generator=g) < torch.tensor([0.6, 0.65, 0.7])
    logits = 3 * one_hot(torch.where(right, labels[:, None], wrong)) + torch.randn(n, 3, CLASSES, generator=g)
    scores = 2 * (2 * right.float() - 1) + 1.5 * torch.randn(n, 3, generator=g)
    return StudentOutputs(logits, scores), labels


def test_selector_routing_over_three_students_uses_all_three_and_beats_random_routing():
    flops = (0.9, 1.1, 1.8)
    holdout, (test, labels) = three_students(3000, 0), three_students(3000, 1)
    router = SelectorRouter(flops, SELECTOR_FLOPS).fit(*holdout, budget=1.6)
    routing = router.route(test)
    assert (routing.ran.sum(1) == 1).all() and (routing.share > 0.05).all()
    assert routing.gflops == pytest.approx(SELECTOR_FLOPS + (routing.share @ torch.tensor(flops).double()).item())
    random = RandomRouter(flops, routing.share.tolist(), router_flops=SELECTOR_FLOPS).fit(*holdout)
    assert random.route(test).gflops == pytest.approx(routing.gflops)  # charged the selector's cost too
    draws = random.draws(test, labels)
    assert draws.shape == (RANDOM_DRAWS, 3000)
    assert routing.accuracy(labels) > draws.double().mean(1).max().item() + 0.1
    curve = router.curve(test, labels)
    assert curve.gflops[0].item() == pytest.approx(SELECTOR_FLOPS + 0.9)  # every image on the cheapest
    assert curve.gflops[-1].item() <= SELECTOR_FLOPS + 1.8 + 1e-9


def teacher_as_last_resort(n, seed):
    """Student 1 (1 GFLOP) is sure and right on 60% of the images, student 2 (2 GFLOPs) on another 20%, the teacher
    (4 GFLOPs) sure and right on 95% of all of them; elsewhere the students are unsure and wrong."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=g)
    wrong = (labels + torch.randint(1, CLASSES, (n,), generator=g)) % CLASSES
    kind = torch.multinomial(torch.tensor([0.6, 0.2, 0.2]), n, replacement=True, generator=g)
    unsure = one_hot(wrong) + 0.5 * one_hot(labels)
    first = torch.where((kind == 0)[:, None], 6 * one_hot(labels), unsure)
    second = torch.where((kind <= 1)[:, None], 6 * one_hot(labels), unsure)
    teacher = 6 * one_hot(torch.where(torch.rand(n, generator=g) < 0.95, labels, wrong))
    return StudentOutputs(torch.stack([first, second, teacher], 1) + 0.3 * torch.randn(n, 3, CLASSES, generator=g)), \
        labels


def test_a_cascade_to_the_teacher_reaches_its_accuracy_for_less_than_it_costs():
    flops = (1.0, 2.0, 4.0)
    (holdout, holdout_labels), (test, labels) = teacher_as_last_resort(4000, 0), teacher_as_last_resort(4000, 1)
    teacher = SingleRouter(flops, order=(2,)).fit(holdout, holdout_labels)
    router = CascadeRouter(flops, order=(0, 1, 2)).fit(holdout, holdout_labels)
    curve = router.curve(holdout, holdout_labels)
    point = curve.cheapest(teacher.route(holdout).accuracy(holdout_labels))
    assert point is not None and curve.gflops[point] < 0.7 * flops[2]
    router.threshold_ = curve.thresholds[point].item()
    routing = router.route(test)
    assert routing.accuracy(labels) >= teacher.route(test).accuracy(labels) - 0.01
    assert routing.gflops < 0.7 * flops[2] and routing.ran[:, 0].all()
    assert 0.1 < routing.ran[:, 2].double().mean().item() < 0.25  # the teacher on (most of) the hard fifth
    assert not (routing.ran[:, 2] & ~routing.ran[:, 1]).any()  # no stage skipped
    first = SingleRouter(flops, order=(0,)).fit(holdout, holdout_labels).route(holdout)
    assert curve.accuracy[0].item() == pytest.approx(first.accuracy(holdout_labels))
    assert curve.gflops[-1].item() == pytest.approx(sum(flops))  # every stage on every image at -inf


# ----------------------------------------------------------------------------- true nulls, through cross-fitting

def planted(n, seed, signal):
    """Two students right on independent 72% of the images, and image features that show which one is right
    with strength ``signal``, beside three features of noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=g)
    wrong = (labels[:, None] + torch.randint(1, CLASSES, (n, 2), generator=g)) % CLASSES
    right = torch.rand(n, 2, generator=g) < 0.72
    logits = 3 * one_hot(torch.where(right, labels[:, None], wrong)) + torch.randn(n, 2, CLASSES, generator=g)
    features = torch.cat([signal * (2 * right.float() - 1), torch.zeros(n, 3)], 1) + torch.randn(n, 5, generator=g)
    return StudentOutputs(logits), features, labels


def logistic_selector(features, targets):
    """A stand-in for the selector CNN: per student, a logistic regression of "this student is right"."""
    fits = [fit_softmax_regression(features, targets[:, k], 2) for k in range(targets.shape[1])]
    return lambda x: torch.stack([(x.double() @ w + b).diff(dim=1)[:, 0] for w, b in fits], 1).float()


def selector_against_random(targets_from, signal):
    """Cross-fitted as trainSelector cross-fits the selector: out-of-fold hold-out scores fit the threshold, a
    refit on the whole hold-out split routes the test split; then random routing at its shares over 200 draws,
    charged the same GFLOPs. Returns the paired interval of the selector's accuracy minus random routing's."""
    holdout, features, labels = planted(4000, 0, signal)
    test, test_features, test_labels = planted(4000, 1, signal)
    targets = selector_targets(holdout.logits, targets_from(labels))
    fold = stratified_folds(labels, 5, seed=0)
    scores = out_of_fold(fold, lambda k, held_out: logistic_selector(features[~held_out], targets[~held_out])(
        features[held_out]))
    router = SelectorRouter(FLOPS, SELECTOR_FLOPS).fit(StudentOutputs(holdout.logits, scores), labels)
    routing = router.route(StudentOutputs(test.logits, logistic_selector(features, targets)(test_features)))
    random = RandomRouter(FLOPS, routing.share.tolist(), router_flops=SELECTOR_FLOPS).fit(holdout, labels)
    assert random.route(test).gflops == pytest.approx(routing.gflops)
    draws = random.draws(test, test_labels)
    return routing, paired_bootstrap(routing.correct(test_labels), draws.double().mean(0))


def test_a_selector_trained_on_pure_noise_does_not_beat_its_random_control():
    routing, interval = selector_against_random(lambda labels: shuffled_labels(labels), signal=0.0)
    assert 0.05 < routing.share[1].item() < 0.95  # it does route, by noise: the comparison is not empty
    assert interval.low <= 0 <= interval.high


def test_a_selector_given_a_planted_signal_beats_its_random_control():
    routing, interval = selector_against_random(lambda labels: labels, signal=2.0)
    assert interval.low > 0.03
