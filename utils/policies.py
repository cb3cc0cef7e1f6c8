"""Routing policies on precomputed network outputs: fitted on the hold-out split, applied to the test split.

A policy is a small estimator: ``fit(outputs, labels, budget=None, accuracy=None)`` learns its
temperatures, weights and threshold from hold-out outputs, ``route(outputs)`` decides for each
image which networks run and what the system predicts, and the resulting ``Routing`` gives
accuracy, routing shares and expected GFLOPs per image. Nothing here runs a network:
``StudentOutputs`` holds the logits of every network a policy chooses among (the students, and the
teacher where it is a cascade's last resort) on every image, and the selector's scores, so a
policy and its whole accuracy-versus-compute curve cost milliseconds. ``build_router(name)`` makes
any policy of ``POLICIES``: the threshold policies of ``utils.choices.ROUTERS`` and the baselines
(one network, the ensemble, random routing); the oracle is ``oracle_routing``.

The threshold policies climb a ladder of options, cheapest first, while an image's score exceeds
one threshold. The cascade runs the next network while the answer so far is unsure, learned
deferral while running it is predicted to gain, the selector moves an image to a dearer student
while its predicted gain per extra GFLOP is large enough. Any number of networks (two or more) is
one ladder.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

UNCERTAINTY_MEASURES = ("maxprob", "margin", "entropy")
RUNG_RULES = ("average", "last")  # what a rung of an escalation answers: the average of what ran, or the last alone
RANDOM_DRAWS = 200  # draws of random routing behind its mean and spread


class NoThresholdError(ValueError):
    """No threshold of a router meets its budget (or reaches its accuracy) on the hold-out split.

    ``cheapest_gflops`` is what its cheapest threshold costs there, ``ratio`` that as a multiple of
    the cheapest network's GFLOPs, and ``least_budget`` the smallest budget in hundredths that fits.
    """

    def __init__(self, message, cheapest_gflops, ratio):
        super().__init__(message)
        self.cheapest_gflops, self.ratio = cheapest_gflops, ratio
        self.least_budget = math.ceil(round(100 * ratio, 6)) / 100


@dataclass(frozen=True)
class StudentOutputs:
    """The logits ``(N, S, C)`` of the S networks a router chooses among, on the same N images (the students in
    routing order, and the teacher where it is a cascade's last resort), and optionally the selector's scores
    ``(N, S)``: per student, a logit of "this student is right"."""

    logits: torch.Tensor
    selector_scores: torch.Tensor | None = None
    temperatures: torch.Tensor | None = None  # (S,): each network's own, fitted once on its hold-out logits

    def __post_init__(self):
        if self.logits.dim() != 3:
            raise ValueError(f"logits must be (images, networks, classes), not {tuple(self.logits.shape)}")
        if self.selector_scores is not None and self.selector_scores.shape != self.logits.shape[:2]:
            raise ValueError(f"selector_scores must be (images, students) = {tuple(self.logits.shape[:2])}, "
                             f"not {tuple(self.selector_scores.shape)}")

    def __len__(self):
        return len(self.logits)

    @property
    def num_networks(self):
        return self.logits.shape[1]

    @property
    def device(self):
        return self.logits.device


@dataclass(frozen=True)
class Routing:
    """What a system did on each of N images."""

    ran: torch.Tensor  # (N, S) bool: the networks run on each image
    probs: torch.Tensor  # (N, C): the system's class probabilities
    flops: tuple  # GFLOPs per image of each network
    router_flops: float = 0.0  # GFLOPs paid on every image before any network runs

    @property
    def prediction(self):
        return self.probs.argmax(1)

    def correct(self, labels):
        return self.prediction == labels

    def accuracy(self, labels):
        return self.correct(labels).double().mean().item()

    @property
    def share(self):
        """Per network, the share of images it ran on; they sum to 1 when one network runs per image."""
        return self.ran.double().mean(0).cpu()

    @property
    def gflops(self):
        """Expected GFLOPs per image: the router's, plus each network's times the share it ran on."""
        return self.router_flops + (self.share @ torch.tensor(self.flops, dtype=torch.float64)).item()


@dataclass(frozen=True)
class Curve:
    """A threshold router at every distinct threshold, from +inf (every image on its first option) to -inf
    (every image as far up its ladder as it goes): per point, the threshold, the share of images that left
    their first option, the accuracy and the GFLOPs per image."""

    thresholds: torch.Tensor
    switched: torch.Tensor
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

    def cheapest(self, min_accuracy):
        """Index of the cheapest point at least ``min_accuracy`` accurate (ties: the more accurate); None if none is."""
        reaches = self.accuracy >= min_accuracy
        if not reaches.any():
            return None
        gflops = self.gflops.masked_fill(~reaches, math.inf)
        return self.accuracy.masked_fill(gflops > gflops.min(), -1.0).argmax().item()


def ladder_curve(climbs, correct, gflops):
    """Accuracy and GFLOPs per image of a threshold router at every distinct threshold.

    Each image stands on a ladder of options: ``correct`` ``(N, L + 1)`` says whether each option is
    right, ``gflops`` ``(N, L + 1)`` what it costs, and ``climbs`` ``(N, L)``, non-increasing along a
    row, where it climbs: at threshold t the image takes option ``(climbs > t).sum()`` (a climb of
    -inf or NaN is never made). The thresholds are climbs themselves, in their own dtype — at each
    point, the largest climb not made — so a router that compares its climbs with one of them routes
    exactly the images the curve counts; +inf and -inf are the ends.
    """
    climbs, correct, gflops = climbs.cpu(), correct.cpu(), gflops.cpu().double()
    n = len(climbs)
    made = (climbs > -math.inf).flatten()  # False for -inf and NaN
    value, order = climbs.flatten()[made].sort(descending=True, stable=True)
    steps = len(value)

    def running(start, change):  # the total after each climb made, in order
        return start + torch.cat([change.new_zeros(1), change.flatten()[made][order].cumsum(0)])

    right = running(correct[:, 0].sum(), correct.long().diff(dim=1))
    cost = running(gflops[:, 0].sum(), gflops.diff(dim=1))
    first_rung = torch.zeros(climbs.shape, dtype=torch.long)
    first_rung[:, :1] = 1
    switched = running(torch.tensor(0), first_rung).double() / n
    thresholds = torch.full((steps + 1,), -math.inf, dtype=climbs.dtype)
    thresholds[0] = math.inf
    thresholds[1:steps] = value[1:]
    distinct = torch.ones(steps + 1, dtype=torch.bool)
    distinct[1:steps] = value[:-1] > value[1:]  # the climbs of one value are made together
    return Curve(thresholds[distinct], switched[distinct], right[distinct].double() / n, cost[distinct] / n)


def cost_envelope(value, cost):
    """Per row of ``value`` ``(N, m)``: the options that maximise ``value - lambda * cost`` as lambda falls from
    +inf to -inf, and the lambda at which each takes over: ``(options (N, m), lambdas (N, m - 1))``.

    The first is the cheapest option (the most valuable of equally cheap ones); each next one is the
    dearer option that overtakes the current one first, at lambda = its gain in value / its extra
    cost. A row with fewer changes repeats its last option, at a lambda of -inf.
    """
    n, m = value.shape
    rows = torch.arange(n, device=value.device)
    current = value.masked_fill(cost > cost.min(), -math.inf).argmax(1)
    options = [current]
    lambdas = []
    for _ in range(m - 1):
        extra_cost = cost[None, :] - cost[current][:, None]
        rate = ((value - value[rows, current][:, None]) / extra_cost).masked_fill(extra_cost <= 0, -math.inf)
        overtaker = m - 1 - rate.flip(1).argmax(1)  # of equal rates the last, the dearest in cost order
        lam = rate[rows, overtaker]
        current = torch.where(lam > -math.inf, overtaker, current)
        options.append(current)
        lambdas.append(lam)
    if not lambdas:
        return torch.stack(options, 1), value.new_empty(n, 0)
    return torch.stack(options, 1), torch.stack(lambdas, 1).cummin(1).values


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


def fit_softmax_regression(features, targets, classes, l2=1e-3, max_iter=50):
    """``(weight (D, classes), bias (classes,))`` of an L2-regularised multinomial logistic regression of the
    class indices ``targets`` on ``features`` ``(N, D)``: Newton's method with a backtracking line search on the
    convex loss, to machine precision (deterministic, and no optimizer object: no ``torch._dynamo`` import).

    The bias is not penalised; softmax ignores a constant added to every class's bias, so the Hessian is
    singular along it, and each step is the least-squares solution (the one without that component).
    """
    x, y = features.double(), targets.long()
    n, d = x.shape
    x = torch.cat([x, x.new_ones(n, 1)], 1)
    penalty = torch.cat([torch.full((d, 1), l2, dtype=x.dtype, device=x.device), x.new_zeros(1, 1)])
    one_hot = F.one_hot(y, classes).double()
    eye = torch.eye(classes, dtype=x.dtype, device=x.device)

    def loss(w):
        return F.cross_entropy(x @ w, y) + (penalty * w.square()).sum()

    w = x.new_zeros(d + 1, classes)
    for _ in range(max_iter):
        p = (x @ w).softmax(1)
        grad = x.T @ (p - one_hot) / n + 2 * penalty * w
        if grad.abs().max() < 1e-12:
            break
        curvature = p[:, :, None] * (eye - p[:, None, :])  # (N, classes, classes): d softmax / d logits
        hessian = torch.einsum("ni,nkl,nj->ikjl", x, curvature, x).reshape((d + 1) * classes, -1) / n
        hessian += torch.diag((2 * penalty).expand(d + 1, classes).reshape(-1))
        step = torch.linalg.lstsq(hessian, grad.reshape(-1, 1)).solution.reshape(d + 1, classes)
        size, current = 1.0, loss(w)
        while loss(w - size * step) > current and size > 1e-10:
            size /= 2
        w = w - size * step
    return w[:-1], w[-1]


class Router:
    """A system of networks, fitted on hold-out outputs and applied to others.

    ``flops``: GFLOPs per image of each network; ``router_flops``: the selector's GFLOPs, paid on
    every image by routers that read its scores (``charged_flops``); ``order``: the networks the
    router chooses among, cheapest first (default: all, as listed). ``fit`` learns one temperature
    per network, so that averaged and thresholded probabilities are calibrated.
    """

    name = "router"
    uses_selector = False

    def __init__(self, flops, router_flops=0.0, order=None):
        self.flops = tuple(float(f) for f in flops)
        self.router_flops = float(router_flops)
        self.order = tuple(range(len(self.flops))) if order is None else tuple(order)

    @property
    def charged_flops(self):
        """GFLOPs paid on every image before any network runs: the selector's, where the router reads it."""
        return self.router_flops if self.uses_selector else 0.0

    def fit(self, outputs, labels, budget=None, accuracy=None):
        """Learn from hold-out ``outputs`` and ``labels``: each network's temperature (the outputs' own where they
        carry them); ``budget`` and ``accuracy`` matter only to threshold routers."""
        self.check(outputs)
        self.temperature_ = outputs.temperatures if outputs.temperatures is not None else \
            fit_temperature(outputs.logits, labels)
        return self

    def at(self, budget=None, accuracy=None):
        """The fitted router for ``budget`` or ``accuracy``: itself, unless a threshold router says otherwise."""
        return self

    def route(self, outputs):
        raise NotImplementedError

    def needs(self, outputs, known):
        """The ``(N, S)`` networks to run, given the logits of those ``known`` to have run so far: what
        ``utils.routed.run_routed`` runs, round after round, until nothing more is needed. Here: what
        ``route`` runs, for routers whose choice does not depend on the networks' logits."""
        return self.route(outputs).ran

    def check(self, outputs):
        if outputs.num_networks != len(self.flops):
            raise ValueError(f"{outputs.num_networks} networks in the outputs but {len(self.flops)} in flops")
        if self.uses_selector and outputs.selector_scores is None:
            raise ValueError(f"the {self.name} router reads the selector's scores, and these outputs have none")

    def probs(self, outputs):
        """Temperature-scaled probabilities ``(N, S, C)`` of every network."""
        return (outputs.logits / self.temperature_.to(outputs.device)[:, None]).softmax(-1)

    def routing(self, ran, probs):
        return Routing(ran, probs, self.flops, self.charged_flops)

    def only(self, outputs, *networks):
        """The ``(N, S)`` mask of "these networks ran", on every image."""
        ran = torch.zeros(len(outputs), outputs.num_networks, dtype=torch.bool, device=outputs.device)
        ran[:, list(networks)] = True
        return ran


class SingleRouter(Router):
    """The first network of ``order`` on every image."""

    name = "single"

    def route(self, outputs):
        return self.routing(self.only(outputs, self.order[0]), self.probs(outputs)[:, self.order[0]])


class EnsembleRouter(Router):
    """Every network of ``order`` on every image; their temperature-scaled probabilities averaged."""

    name = "ensemble"

    def route(self, outputs):
        return self.routing(self.only(outputs, *self.order), self.probs(outputs)[:, list(self.order)].mean(1))


class RandomRouter(Router):
    """One student per image, drawn at random in fixed ``shares`` (a permutation, so the shares are exact),
    charged ``router_flops`` on every image (the selector's, to stand beside selector routing).

    The fair comparison for a router that sends one student per image: the same shares cost the
    same GFLOPs, so any accuracy it has beyond this is what its choices are worth. One draw
    (``seed``) is noisy; ``draws`` gives many.
    """

    name = "random"

    def __init__(self, flops, shares, seed=0, router_flops=0.0, order=None):
        super().__init__(flops, router_flops, order)
        if len(shares) != len(self.flops) or abs(sum(shares) - 1) > 1e-6 or min(shares) < 0:
            raise ValueError(f"shares must be {len(self.flops)} non-negative numbers summing to 1, not {shares}")
        self.shares = tuple(float(s) for s in shares)
        self.seed = seed

    @property
    def charged_flops(self):
        return self.router_flops

    def choice(self, n, seed):
        """``(n,)``: the student of each image in the draw ``seed``."""
        bounds = (torch.tensor(self.shares, dtype=torch.float64).cumsum(0) * n).round().long()
        counts = bounds.diff(prepend=bounds.new_zeros(1))
        choice = torch.empty(n, dtype=torch.long)
        choice[torch.randperm(n, generator=torch.Generator().manual_seed(seed))] = \
            torch.repeat_interleave(torch.arange(len(self.shares)), counts)
        return choice

    def route(self, outputs):
        n = len(outputs)
        choice = self.choice(n, self.seed).to(outputs.device)
        probs = self.probs(outputs)[torch.arange(n, device=outputs.device), choice]
        return self.routing(F.one_hot(choice, outputs.num_networks).bool(), probs)

    def draws(self, outputs, labels, count=RANDOM_DRAWS):
        """``(count, N)`` bool: whether each of ``count`` draws (seeds 0 to count - 1) is right on each image."""
        right = (self.probs(outputs).argmax(-1) == labels[:, None]).cpu()
        rows = torch.arange(len(outputs))
        return torch.stack([right[rows, self.choice(len(outputs), seed)] for seed in range(count)])


def oracle_routing(outputs, labels, flops):
    """Every student run, the answer of one that is right wherever one is: the ceiling of any routing."""
    probs = outputs.logits.softmax(-1)
    right = probs.argmax(-1) == labels[:, None]
    pick = right.long().argmax(1)  # the first right student, or student 0 where none is
    ran = torch.ones(right.shape, dtype=torch.bool)
    return Routing(ran, probs[torch.arange(len(labels)), pick], tuple(float(f) for f in flops))


class ThresholdRouter(Router):
    """Each image climbs a ladder of options, cheapest first, while its score exceeds ``threshold_``.

    Subclasses say what the options are (``options``: per image and rung, the networks run and the
    system's probabilities) and where each image climbs (``climbs``: per image and rung, the score
    compared with the threshold, non-increasing up the ladder; learned in ``fit_score`` if needed).
    ``fit`` takes the threshold with the best hold-out accuracy among those whose hold-out cost is
    within ``budget`` times the cheapest network's GFLOPs (ties: the cheaper); with ``accuracy``, the
    cheapest threshold at least that accurate on the hold-out split (ties: the more accurate); with
    neither, the best hold-out accuracy. Every threshold is one of the hold-out climbs, in their
    dtype, so ``route`` on the hold-out outputs gives exactly the point of ``curve`` it was chosen
    from. No threshold that fits is a ``NoThresholdError``.
    """

    def fit(self, outputs, labels, budget=None, accuracy=None):
        super().fit(outputs, labels)
        self.fit_score(outputs, labels)
        self.curve_ = self.curve(outputs, labels)
        self.threshold_ = self.at(budget, accuracy).threshold_
        return self

    def at(self, budget=None, accuracy=None):
        """A copy of the fitted router whose threshold is the one ``fit`` would choose for ``budget`` or
        ``accuracy``, taken from its hold-out curve without fitting again."""
        cheapest = min(self.flops[k] for k in self.order)
        max_gflops = None if budget is None else budget * cheapest
        point = self.curve_.best(max_gflops) if accuracy is None else self.curve_.cheapest(accuracy)
        if point is None:
            least = self.curve_.gflops.min().item()
            wanted = f"costs at most {max_gflops:.3f} GFLOPs per image on the hold-out split (a budget of " \
                     f"{budget:g}x the cheapest network's {cheapest:.3f})" if accuracy is None else \
                f"is at least {accuracy:.4f} accurate on the hold-out split"
            raise NoThresholdError(f"no {self.name} threshold {wanted}; the cheapest costs {least:.3f}", least,
                                   least / cheapest)
        router = copy.copy(self)
        router.threshold_ = self.curve_.thresholds[point].item()
        router.holdout_accuracy_ = self.curve_.accuracy[point].item()
        return router

    def fit_score(self, outputs, labels):
        """Learn what ``climbs`` needs from hold-out outputs (nothing, unless a subclass says otherwise)."""

    def options(self, outputs):
        """``(ran (N, L + 1, S) bool, probs (N, L + 1, C))``: what each rung of each image's ladder runs and
        predicts."""
        raise NotImplementedError

    def climbs(self, outputs):
        """``(N, L)``: the score each image must exceed the threshold by to climb each rung."""
        raise NotImplementedError

    def rung(self, outputs):
        """``(N,)``: the option each image takes at ``threshold_``."""
        return (self.climbs(outputs) > self.threshold_).sum(1)

    def route(self, outputs):
        self.check(outputs)
        ran, probs = self.options(outputs)
        taken = torch.arange(len(outputs), device=outputs.device), self.rung(outputs)
        return self.routing(ran[taken], probs[taken])

    def curve(self, outputs, labels):
        """Accuracy and GFLOPs per image on these outputs at every distinct threshold."""
        self.check(outputs)
        ran, probs = self.options(outputs)
        correct = probs.argmax(-1) == labels.to(outputs.device)[:, None]
        gflops = self.charged_flops + ran.double() @ torch.tensor(self.flops, dtype=torch.float64,
                                                                   device=outputs.device)
        return ladder_curve(self.climbs(outputs), correct, gflops)


class EscalationRouter(ThresholdRouter):
    """The networks of ``order`` in turn: an image goes on to the next while its score, from the answer so
    far, exceeds the threshold at every step. Rung k runs the first k + 1 networks and answers, by its
    ``rule_``, with the average of their temperature-scaled probabilities (``average``) or with the last
    one's alone (``last``: a cascade that ends in a stronger network answers as it does); ``fit`` takes
    the rule of the better hold-out accuracy (ties: the average)."""

    rule_ = "average"

    def fit(self, outputs, labels, budget=None, accuracy=None):
        best = {}
        for rule in RUNG_RULES:
            self.rule_ = rule
            super().fit(outputs, labels)
            best[rule] = self.curve_.accuracy.max().item()
        self.rule_ = max(RUNG_RULES, key=lambda rule: (best[rule], rule == "average"))
        return super().fit(outputs, labels, budget, accuracy)

    def options(self, outputs):
        chain = list(self.order)
        probs = self.probs(outputs)[:, chain]
        answers = probs if self.rule_ == "last" else \
            probs.cumsum(1) / torch.arange(1, len(chain) + 1, device=outputs.device)[:, None]
        ran = torch.zeros(len(outputs), len(chain), outputs.num_networks, dtype=torch.bool, device=outputs.device)
        for rung in range(len(chain)):
            ran[:, rung, chain[:rung + 1]] = True
        return ran, answers

    def climbs(self, outputs):
        _, answers = self.options(outputs)
        return self.step_scores(answers[:, :-1], outputs).cummin(1).values

    def step_scores(self, answers, outputs):
        """``(N, L)``: per image, the score of going on from each answer so far ``(N, L, C)``."""
        raise NotImplementedError

    def needs(self, outputs, known):
        """The next network of the chain, on the images that have run the ones before it and climb."""
        chain = torch.tensor(self.order, device=outputs.device)
        done = known[:, chain].long().cumprod(1).sum(1)  # the chain's networks run so far, in turn
        goes_on = torch.cat([torch.ones(len(outputs), 1, dtype=torch.bool, device=outputs.device),
                             self.climbs(outputs) > self.threshold_], 1)
        go = (done < len(chain)) & goes_on.gather(1, done.clamp(max=len(chain) - 1)[:, None]).squeeze(1)
        wanted = torch.zeros_like(known)
        wanted[go.nonzero().flatten(), chain[done[go]]] = True
        return wanted


class CascadeRouter(EscalationRouter):
    """A confidence cascade: the next network also runs where the answer so far is unsure, its uncertainty
    (``measure``: maxprob, margin or entropy, see ``uncertainty``) above ``threshold_``."""

    name = "cascade"

    def __init__(self, flops, router_flops=0.0, order=None, measure="maxprob"):
        super().__init__(flops, router_flops, order)
        if measure not in UNCERTAINTY_MEASURES:
            raise ValueError(f"unknown uncertainty measure {measure!r}; choose from {', '.join(UNCERTAINTY_MEASURES)}")
        self.measure = measure

    def step_scores(self, answers, outputs):
        return uncertainty(answers, self.measure)


class DeferralRouter(EscalationRouter):
    """Learned deferral: a cascade whose score is the predicted gain of running the next network.

    At each step a multinomial logistic regression predicts from the answer so far (its ``top_k``
    sorted probabilities and its normalised entropy; the margin is a linear function of these), plus
    the selector's scores with ``use_selector``, whether averaging in the next network helps (a wrong
    answer made right), hurts (a right answer made wrong) or changes nothing. The score is P(helps) -
    P(hurts), the expected gain in accuracy: an image where deferring helps as often as it hurts is
    not worth the compute, however unsure the first answer is.
    """

    name = "deferral"

    def __init__(self, flops, router_flops=0.0, order=None, top_k=3, use_selector=False, l2=1e-3):
        super().__init__(flops, router_flops, order)
        self.top_k, self.uses_selector, self.l2 = top_k, use_selector, l2

    def features(self, answer, outputs):
        columns = [answer.topk(self.top_k, dim=1).values, uncertainty(answer, "entropy")[:, None]]
        if self.uses_selector:
            columns.append(outputs.selector_scores)
        return torch.cat(columns, 1).double()

    def fit_score(self, outputs, labels):
        _, answers = self.options(outputs)
        correct = (answers.argmax(-1) == labels.to(outputs.device)[:, None]).long()
        self.steps_ = []
        for step in range(answers.shape[1] - 1):
            x = self.features(answers[:, step], outputs)
            mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
            gain = correct[:, step + 1] - correct[:, step]  # -1 hurts, 0 changes nothing, 1 helps
            self.steps_.append((mean, std, *fit_softmax_regression((x - mean) / std, gain + 1, 3, self.l2)))

    def step_scores(self, answers, outputs):
        scores = []
        for step, step_fit in enumerate(self.steps_):
            mean, std, weight, bias = (t.to(outputs.device) for t in step_fit)
            p = (((self.features(answers[:, step], outputs) - mean) / std) @ weight + bias).softmax(1)
            scores.append(p[:, 2] - p[:, 0])
        return torch.stack(scores, 1)


class SelectorRouter(ThresholdRouter):
    """One student per image, by the selector's probabilities that each student is right.

    The selector runs on every image (``router_flops``), then the student of ``order`` that maximises
    P(right) - threshold * GFLOPs (``cost_envelope``): from +inf (the cheapest student everywhere) to
    -inf, an image climbs to a dearer student where the predicted gain per extra GFLOP exceeds the
    threshold. For two students: the second where P(second right) - P(first right) exceeds the
    threshold times their difference in GFLOPs.
    """

    name = "selector"
    uses_selector = True

    def ladder(self, outputs):
        """``(students (N, L + 1), climbs (N, L))``: each image's students, cheapest first, and its climbs."""
        order = torch.tensor(self.order, device=outputs.device)
        right = outputs.selector_scores[:, order].sigmoid()
        cost = torch.tensor([self.flops[k] for k in self.order], dtype=right.dtype, device=outputs.device)
        rungs, climbs = cost_envelope(right, cost)
        return order[rungs], climbs

    def options(self, outputs):
        students, _ = self.ladder(outputs)
        probs = self.probs(outputs)[torch.arange(len(outputs), device=outputs.device)[:, None], students]
        return F.one_hot(students, outputs.num_networks).bool(), probs

    def climbs(self, outputs):
        return self.ladder(outputs)[1]


POLICIES = {router.name: router for router in (SingleRouter, EnsembleRouter, RandomRouter, CascadeRouter,
                                                DeferralRouter, SelectorRouter)}


def build_router(name, **kwargs):
    """The policy registered as ``name`` in ``POLICIES``, e.g. ``build_router("cascade", flops=[1.8, 2.9])``."""
    if name not in POLICIES:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)
