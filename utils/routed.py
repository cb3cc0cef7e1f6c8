"""A routed system: a routing policy over trained networks, fitted on their hold-out logits, run on images.

``Ladder`` says what a policy routes: the networks it climbs (cheapest first), the selector whose
scores it may read, and a last resort climbed after them all (the teacher of a cascade).
``fit_policy`` is the one way to fit a policy of ``utils.policies`` over a ladder; ``run_routed``
then runs the system on a batch of images, each network only where the policy needs it, and
``timed`` measures how fast a system runs.
"""

import time
from dataclasses import dataclass, replace

import torch

from utils.cli import UserError
from utils.data import normalize
from utils.policies import StudentOutputs, build_router


@dataclass(frozen=True)
class Ladder:
    """What a routing policy routes: ``networks`` (``utils.networks.Trained``, each with its logits, climbed
    cheapest first), the ``selector`` whose scores the policy may read and whose GFLOPs it is then charged,
    and a ``last_resort`` climbed after them all (a cascade's teacher)."""

    networks: tuple
    selector: object = None
    last_resort: object = None

    @property
    def all(self):
        """The networks in the order of the policy's indices: ``networks``, then the last resort."""
        return [*self.networks, *([self.last_resort] if self.last_resort else [])]

    def order(self):
        """The policy's climb: ``networks`` cheapest first (by GFLOPs measured), then the last resort."""
        cheapest_first = sorted(range(len(self.networks)), key=lambda k: self.networks[k].gflops)
        return cheapest_first + ([len(self.networks)] if self.last_resort else [])

    def outputs(self, split, scores=True):
        """``(StudentOutputs, labels)`` of a split: every network's logits and hold-out temperature, and the
        selector's scores (out-of-fold on the hold-out split) if it has one and ``scores``; refused if the
        networks were evaluated on different images."""
        networks = self.all
        labels = networks[0].logits[split][1]
        for net in networks[1:]:
            if not torch.equal(net.logits[split][1], labels):
                raise UserError(f"{net.path} was evaluated on other {split} images than {networks[0].path}; train "
                                "every network of an experiment on the same split (--holdout, --split-seed, --limit)")
        selector_scores = self.selector.logits[split][0] if self.selector and scores else None
        outputs = StudentOutputs(torch.stack([net.logits[split][0] for net in networks], 1), selector_scores)
        return replace(outputs, temperatures=torch.stack([net.temperature for net in networks])), labels


def fit_policy(name, ladder, budget=None, accuracy=None, part=None, **options):
    """The policy ``name`` of ``utils.policies.POLICIES`` over ``ladder``, fitted on the whole hold-out split (where
    the selector's scores are out-of-fold: each image's from a selector that never trained on it), or on the
    images of its mask ``part``, every temperature then fitted on them too.

    A threshold policy takes its most accurate threshold within ``budget`` (a multiple of the cheapest
    network's GFLOPs), or its cheapest at least ``accuracy`` accurate, or its most accurate; one that
    fits none is a ``utils.policies.NoThresholdError``. ``options`` are the policy's own (random
    routing's ``shares``).
    """
    selector_flops = ladder.selector.gflops if ladder.selector else 0.0
    router = build_router(name, flops=[net.gflops for net in ladder.all], router_flops=selector_flops,
                          order=ladder.order(), **options)
    if ladder.last_resort and router.uses_selector:
        raise ValueError(f"the {name} router chooses among the students the selector scores, not a last resort")
    holdout, labels = ladder.outputs("holdout", scores=router.uses_selector)
    if len(labels) == 0:
        raise UserError("the students were trained with --holdout 0: there is no hold-out split to fit routing on")
    if part is not None:
        scores = holdout.selector_scores
        holdout, labels = StudentOutputs(holdout.logits[part], None if scores is None else scores[part]), labels[part]
    return router.fit(holdout, labels, budget, accuracy)


def budget_refusal(name, budget, error):
    """The one-line refusal of a ``--budget`` that no threshold of the policy ``name`` meets (``error``: what
    ``fit_policy`` raised), naming the least budget that fits."""
    return UserError(f"--budget {budget:g} is below the cheapest {name} system: on the hold-out split it costs "
                     f"{error.cheapest_gflops:.3f} GFLOPs per image, {error.ratio:.3f}x the cheapest student's; give "
                     f"--budget {error.least_budget:g} or more")


@torch.no_grad()
def run_routed(router, networks, selector, x, num_classes):
    """A fitted router's system on the batch ``x``, running each network only where the router needs it
    (``routed_outputs``). Returns the router's ``Routing``."""
    return router.route(routed_outputs(router, networks, selector, x, num_classes)[0])


@torch.no_grad()
def routed_outputs(router, networks, selector, x, num_classes):
    """``(StudentOutputs, ran (N, S) bool)``: the logits of the networks a fitted router runs on the batch ``x``
    (zero where they did not run) and the selector's scores, each network run only where the router needs it.

    The selector runs first, on every image, if the router reads it; then, round after round, the
    networks ``router.needs`` given what has run (a cascade: its next network, on the images still
    unsure).
    """
    n = len(x)
    logits = torch.zeros(n, len(networks), num_classes, device=x.device)
    scores = selector(x).float() if router.uses_selector else None
    known = torch.zeros(n, len(networks), dtype=torch.bool, device=x.device)
    while True:
        wanted = router.needs(StudentOutputs(logits, scores), known) & ~known
        if not wanted.any():
            return StudentOutputs(logits, scores), known
        for k in wanted.any(0).nonzero().flatten().tolist():
            idx = wanted[:, k].nonzero().flatten()
            logits[idx, k] = networks[k](x[idx]).float()
        known |= wanted


@torch.no_grad()
def batched_routed(router, networks, selector, images, runtime, batch_size=1024, num_classes=10):
    """``run_routed`` over uint8 ``images`` in batches: ``(probs (N, C), ran (N, S))`` on the device."""
    probs, ran = [], []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(runtime.device), runtime.cuda)
        with runtime.autocast:
            routing = run_routed(router, networks, selector, x, num_classes)
        probs.append(routing.probs)
        ran.append(routing.ran)
    return torch.cat(probs), torch.cat(ran)


def timed(fn, runtime, passes=1):
    """``(result, [seconds of each timed call])`` of ``passes`` calls of ``fn()`` after an untimed one: the same on
    every device.

    The first, untimed call sees every batch shape once, so neither cuDNN's kernel search nor
    any other first-call cost is timed.
    """
    result = fn()
    seconds = []
    for _ in range(passes):
        runtime.synchronize()
        start = time.perf_counter()
        result = fn()
        runtime.synchronize()
        seconds.append(time.perf_counter() - start)
    return result, seconds
