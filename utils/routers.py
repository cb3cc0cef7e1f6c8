"""Routing policies on precomputed student outputs: fitted on the hold-out split, applied to the test split.

A router is a small estimator: ``fit(outputs, labels, budget)`` learns its temperatures, weights
and threshold from hold-out outputs, ``route(outputs)`` decides for each image which students run
and what the system predicts, and the resulting ``Routing`` gives accuracy, routing shares and
expected GFLOPs per image. Nothing here runs a network: ``StudentOutputs`` holds every student's
logits on every image (and the selector's scores), so a policy and its whole accuracy-versus-
compute curve cost milliseconds. ``build_router(name)`` makes the policies of ``ROUTERS``; the
baselines (one student, the ensemble, random routing, the oracle) share the same interface.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

UNCERTAINTY_MEASURES = ("maxprob", "margin", "entropy")


@dataclass(frozen=True)
class StudentOutputs:
    """Every student's logits ``(N, S, C)`` on the same N images, students in routing order, and
    optionally the selector's scores ``(N, S)``: per student, a logit of "this student is right"."""

    logits: torch.Tensor
    selector_scores: torch.Tensor | None = None

    def __post_init__(self):
        if self.logits.dim() != 3:
            raise ValueError(f"logits must be (images, students, classes), not {tuple(self.logits.shape)}")
        if self.selector_scores is not None and self.selector_scores.shape != self.logits.shape[:2]:
            raise ValueError(f"selector_scores must be (images, students) = {tuple(self.logits.shape[:2])}, "
                             f"not {tuple(self.selector_scores.shape)}")

    def __len__(self):
        return len(self.logits)

    @property
    def num_students(self):
        return self.logits.shape[1]


@dataclass(frozen=True)
class Routing:
    """What a system did on each of N images."""

    ran: torch.Tensor  # (N, S) bool: the students run on each image
    probs: torch.Tensor  # (N, C): the system's class probabilities
    flops: tuple  # GFLOPs per image of each student
    router_flops: float = 0.0  # GFLOPs paid on every image before any student runs

    @property
    def prediction(self):
        return self.probs.argmax(1)

    def correct(self, labels):
        return self.prediction == labels

    def accuracy(self, labels):
        return self.correct(labels).double().mean().item()

    @property
    def share(self):
        """Per student, the share of images it ran on; they sum to 1 when one student runs per image."""
        return self.ran.double().mean(0)

    @property
    def gflops(self):
        """Expected GFLOPs per image: the router's, plus each student's times the share it ran on."""
        return self.router_flops + (self.share @ torch.tensor(self.flops, dtype=torch.float64)).item()


@dataclass(frozen=True)
class Curve:
    """A threshold router at every distinct threshold, from switching no image to switching all:
    per point, the threshold, the share of images switched, the accuracy and the GFLOPs per image."""

    thresholds: torch.Tensor
    switched: torch.Tensor  # share of images given the switch option
    accuracy: torch.Tensor
    gflops: torch.Tensor

    def best(self, max_gflops=None):
        """Index of the most accurate point costing at most ``max_gflops`` (ties: the cheaper); None if none does."""
        feasible = torch.ones_like(self.gflops, dtype=torch.bool) if max_gflops is None else \
            self.gflops <= max_gflops + 1e-9
        if not feasible.any():
            return None
        accuracy = self.accuracy.masked_fill(~feasible, -1.0)
        return self.gflops.masked_fill(accuracy < accuracy.max(), math.inf).argmin().item()


def threshold_curve(score, correct_keep, correct_switch, gflops_keep, gflops_switch):
    """Accuracy and GFLOPs of "the switch option where ``score > threshold``, the keep option elsewhere".

    One point per distinct outcome: thresholds lie halfway between consecutive distinct scores,
    with +inf (switch no image) and -inf (switch every image) at the ends.
    """
    score, order = score.double().sort(descending=True)
    n = len(score)
    gain = (correct_switch.long() - correct_keep.long())[order]
    right = correct_keep.sum() + torch.cat([gain.new_zeros(1), gain.cumsum(0)])  # switching the k top scores
    inf = score.new_full((1,), math.inf)
    thresholds = torch.cat([inf, (score[:-1] + score[1:]) / 2, -inf])
    distinct = torch.cat([torch.tensor([True]), score[:-1] > score[1:], torch.tensor([True])])
    switched = torch.arange(n + 1, dtype=torch.float64)[distinct] / n
    return Curve(thresholds[distinct], switched, right[distinct].double() / n,
                 gflops_keep + switched * (gflops_switch - gflops_keep))


def fit_temperature(logits, labels, log_range=(-3.0, 3.0), steps=60):
    """Per student, the temperature T that minimises the NLL of ``softmax(logits / T)``: ``(N, S, C)`` -> ``(S,)``.

    The NLL is convex in 1 / T, hence unimodal in log T: a golden-section search over log T in
    ``log_range`` finds its minimum (to within 1e-11 after 60 steps).
    """
    dtype, logits = logits.dtype, logits.double()
    target = labels[:, None, None].expand(-1, logits.shape[1], 1)

    def nll(log_t):
        return -(logits / log_t.exp()[:, None]).log_softmax(-1).gather(-1, target).mean((0, 2))

    ratio = (math.sqrt(5) - 1) / 2
    lo = torch.full((logits.shape[1],), log_range[0], dtype=torch.float64)
    hi = torch.full_like(lo, log_range[1])
    for _ in range(steps):
        left, right = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        left_lower = nll(left) < nll(right)
        lo, hi = torch.where(left_lower, lo, left), torch.where(left_lower, right, hi)
    return ((lo + hi) / 2).exp().to(dtype)


def uncertainty(probs, measure="maxprob"):
    """How unsure a classifier is, from its probabilities ``(..., C)``: in [0, 1], higher is less sure.

    ``maxprob``: 1 - top probability; ``margin``: 1 - (top - second probability); ``entropy``:
    entropy / log C.
    """
    if measure == "maxprob":
        return 1 - probs.amax(-1)
    if measure == "margin":
        top = probs.topk(2, dim=-1).values
        return 1 - (top[..., 0] - top[..., 1])
    if measure == "entropy":
        return -torch.special.xlogy(probs, probs).sum(-1) / math.log(probs.shape[-1])
    raise ValueError(f"unknown uncertainty measure {measure!r}; choose from {', '.join(UNCERTAINTY_MEASURES)}")


def fit_logistic(features, targets, l2=1e-3, max_iter=200):
    """``(weight, bias)`` of an L2-regularised logistic regression, by full-batch L-BFGS (deterministic)."""
    x, y = features.double(), targets.double()
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.binary_cross_entropy_with_logits(x @ params[:-1] + params[-1], y) + l2 * params[:-1].square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return params.detach()[:-1], params.detach()[-1]


class Router:
    """A system of students, fitted on hold-out outputs and applied to others.

    ``flops``: GFLOPs per image of each student; ``router_flops``: the selector's GFLOPs, paid on
    every image by routers that read its scores; ``order``: the students a two-option router
    chooses between, the default (first, cheaper) one first. ``fit`` learns one temperature per
    student, so that averaged and thresholded probabilities are calibrated.
    """

    name = "router"
    uses_selector = False

    def __init__(self, flops, router_flops=0.0, order=(0, 1)):
        self.flops = tuple(float(f) for f in flops)
        self.router_flops = float(router_flops)
        self.order = tuple(order)

    def fit(self, outputs, labels, budget=None):
        """Learn from hold-out ``outputs`` and ``labels``; ``budget`` matters only to threshold routers."""
        self.check(outputs)
        self.temperature_ = fit_temperature(outputs.logits, labels)
        return self

    def route(self, outputs):
        raise NotImplementedError

    def check(self, outputs):
        if outputs.num_students != len(self.flops):
            raise ValueError(f"{outputs.num_students} students in the outputs but {len(self.flops)} in flops")
        if self.uses_selector and outputs.selector_scores is None:
            raise ValueError(f"the {self.name} router reads the selector's scores, and these outputs have none")

    def probs(self, outputs):
        """Temperature-scaled probabilities ``(N, S, C)`` of every student."""
        return (outputs.logits / self.temperature_[:, None]).softmax(-1)

    def routing(self, ran, probs):
        return Routing(ran, probs, self.flops, self.router_flops if self.uses_selector else 0.0)

    def only(self, outputs, *students):
        """The ``(N, S)`` mask of "these students ran", on every image."""
        ran = torch.zeros(len(outputs), outputs.num_students, dtype=torch.bool)
        ran[:, list(students)] = True
        return ran


class SingleStudentRouter(Router):
    """One student on every image."""

    def __init__(self, flops, student=0):
        super().__init__(flops, order=(student,))
        self.name = f"student {student + 1}"

    def route(self, outputs):
        return self.routing(self.only(outputs, self.order[0]), self.probs(outputs)[:, self.order[0]])


class EnsembleRouter(Router):
    """Every student on every image; their temperature-scaled probabilities averaged."""

    name = "ensemble"

    def route(self, outputs):
        return self.routing(self.only(outputs, *range(outputs.num_students)), self.probs(outputs).mean(1))


class RandomRouter(Router):
    """One student per image, drawn at random in fixed ``shares`` (a permutation, so the shares are exact).

    The fair comparison for a router that sends one student per image: the same shares cost the
    same GFLOPs, so any accuracy it has beyond this is what its choices are worth.
    """

    name = "random"

    def __init__(self, flops, shares, seed=0):
        super().__init__(flops)
        if len(shares) != len(self.flops) or abs(sum(shares) - 1) > 1e-6 or min(shares) < 0:
            raise ValueError(f"shares must be {len(self.flops)} non-negative numbers summing to 1, not {shares}")
        self.shares = tuple(float(s) for s in shares)
        self.seed = seed

    def route(self, outputs):
        n, students = len(outputs), outputs.num_students
        bounds = (torch.tensor(self.shares, dtype=torch.float64).cumsum(0) * n).round().long()
        counts = bounds.diff(prepend=bounds.new_zeros(1))
        choice = torch.empty(n, dtype=torch.long)
        choice[torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))] = \
            torch.repeat_interleave(torch.arange(students), counts)
        probs = self.probs(outputs)[torch.arange(n), choice]
        return self.routing(F.one_hot(choice, students).bool(), probs)


def oracle_routing(outputs, labels, flops):
    """Every student run, the answer of one that is right wherever one is: the ceiling of any routing."""
    probs = outputs.logits.softmax(-1)
    right = probs.argmax(-1) == labels[:, None]
    pick = right.long().argmax(1)  # the first right student, or student 0 where none is
    ran = torch.ones(right.shape, dtype=torch.bool)
    return Routing(ran, probs[torch.arange(len(labels)), pick], tuple(float(f) for f in flops))


class ThresholdRouter(Router):
    """Two options per image: ``keep`` everywhere except where ``score > threshold_``, which ``switch``.

    Subclasses say what each option runs and predicts (``options``) and what the score is
    (``score``, learned in ``fit_score`` if needed). ``fit`` takes the threshold with the best
    hold-out accuracy among those whose hold-out cost is within ``budget`` times the cheapest
    student's GFLOPs (ties: the cheaper); with no budget, the best hold-out accuracy.
    """

    def fit(self, outputs, labels, budget=None):
        super().fit(outputs, labels)
        self.fit_score(outputs, labels)
        curve = self.curve(outputs, labels)
        max_gflops = None if budget is None else budget * min(self.flops)
        best = curve.best(max_gflops)
        if best is None:
            raise ValueError(f"no {self.name} threshold costs at most {max_gflops:.3f} GFLOPs per image "
                             f"(budget {budget}); the cheapest costs {curve.gflops.min().item():.3f}")
        self.threshold_ = curve.thresholds[best].item()
        return self

    def fit_score(self, outputs, labels):
        """Learn what ``score`` needs from hold-out outputs (nothing, unless a subclass says otherwise)."""

    def score(self, outputs):
        raise NotImplementedError

    def options(self, outputs):
        """``(keep, switch)``: the two ``Routing`` each image chooses between."""
        raise NotImplementedError

    def route(self, outputs):
        self.check(outputs)
        switched = (self.score(outputs) > self.threshold_)[:, None]
        keep, switch = self.options(outputs)
        return self.routing(torch.where(switched, switch.ran, keep.ran),
                            torch.where(switched, switch.probs, keep.probs))

    def curve(self, outputs, labels):
        """Accuracy and GFLOPs per image on these outputs at every distinct threshold."""
        self.check(outputs)
        keep, switch = self.options(outputs)
        return threshold_curve(self.score(outputs), keep.correct(labels), switch.correct(labels),
                               keep.gflops, switch.gflops)


class EscalationRouter(ThresholdRouter):
    """Run the first student; where the score says so, also run the second and average their probabilities."""

    def options(self, outputs):
        first, second = self.order
        probs = self.probs(outputs)
        return (self.routing(self.only(outputs, first), probs[:, first]),
                self.routing(self.only(outputs, first, second), (probs[:, first] + probs[:, second]) / 2))


class CascadeRouter(EscalationRouter):
    """A confidence cascade: the second student also runs where the first one's temperature-scaled
    uncertainty (``measure``: maxprob, margin or entropy, see ``uncertainty``) exceeds ``threshold_``."""

    name = "cascade"

    def __init__(self, flops, router_flops=0.0, order=(0, 1), measure="maxprob"):
        super().__init__(flops, router_flops, order)
        if measure not in UNCERTAINTY_MEASURES:
            raise ValueError(f"unknown uncertainty measure {measure!r}; choose from {', '.join(UNCERTAINTY_MEASURES)}")
        self.measure = measure

    def score(self, outputs):
        return uncertainty(self.probs(outputs)[:, self.order[0]], self.measure)


class DeferralRouter(EscalationRouter):
    """Learned deferral: a cascade whose score is a logistic regression's logit of "deferring helps".

    Features, from the first student's temperature-scaled probabilities: its ``top_k`` sorted
    probabilities and its normalised entropy (the margin is already a linear function of these),
    plus the selector's scores with ``use_selector``. The target is "the averaged pair is right where
    the first student alone is wrong": deferring changes the outcome only on images where one of
    the two is right, and the reverse case (the pair spoils a right answer) is rare enough that the
    probability of helping ranks images almost as the expected gain does.
    """

    name = "deferral"

    def __init__(self, flops, router_flops=0.0, order=(0, 1), top_k=3, use_selector=False, l2=1e-3):
        super().__init__(flops, router_flops, order)
        self.top_k, self.uses_selector, self.l2 = top_k, use_selector, l2

    def features(self, outputs):
        probs = self.probs(outputs)[:, self.order[0]]
        columns = [probs.topk(self.top_k, dim=1).values, uncertainty(probs, "entropy")[:, None]]
        if self.uses_selector:
            columns.append(outputs.selector_scores)
        return torch.cat(columns, 1).double()

    def fit_score(self, outputs, labels):
        keep, switch = self.options(outputs)
        x = self.features(outputs)
        self.mean_, self.std_ = x.mean(0), x.std(0).clamp_min(1e-6)
        helps = switch.correct(labels) & ~keep.correct(labels)
        self.weight_, self.bias_ = fit_logistic((x - self.mean_) / self.std_, helps, self.l2)

    def score(self, outputs):
        return (self.features(outputs) - self.mean_) / self.std_ @ self.weight_ + self.bias_


class SelectorRouter(ThresholdRouter):
    """One student per image, by the selector's predicted gain P(second right) - P(first right).

    The selector runs on every image (``router_flops``), then the first student, or the second
    where the gain exceeds ``threshold_``.
    """

    name = "selector"
    uses_selector = True

    def options(self, outputs):
        probs = self.probs(outputs)
        return tuple(self.routing(self.only(outputs, k), probs[:, k]) for k in self.order)

    def score(self, outputs):
        first, second = self.order
        right = outputs.selector_scores.sigmoid()
        return right[:, second] - right[:, first]


ROUTERS = {router.name: router for router in (CascadeRouter, DeferralRouter, SelectorRouter)}


def build_router(name, **kwargs):
    """The router registered as ``name`` in ``ROUTERS``, e.g. ``build_router("cascade", flops=[1.8, 2.9])``."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}")
    return ROUTERS[name](**kwargs)


def selector_targets(logits, labels):
    """The selector's training targets ``(N, S)``: 1 where student k is right, else 0.

    Why not "the student with the lowest cross-entropy"? Both students are right on most images,
    and there the label separates two right answers by which one happens to be more confident:
    noise for the image, and a systematic vote for whichever student is sharper. A classifier
    trained on it predicts that majority student everywhere, which is what the first GPU run's
    selector learned. "Is student k right" keeps the signal: the images where the students
    disagree (``students_disagree``) are the only ones whose routing matters.
    """
    return (logits.argmax(-1) == labels[:, None]).float()


def students_disagree(logits, labels):
    """``(N,)`` bool: some student is right and some is wrong (for two students: exactly one is right)."""
    right = logits.argmax(-1) == labels[:, None]
    return right.any(1) & ~right.all(1)


def shuffled_labels(labels, seed=0):
    """The labels permuted across images: the class frequencies kept, every image-label link broken."""
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]

