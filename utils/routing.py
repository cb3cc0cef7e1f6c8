"""Students, the selector and the teacher together: loading, the hold-out folds, fitting routers, routed prediction
and its timing."""

import math
import time

import torch

from utils.checkpoint import load_checkpoint
from utils.cli import POSITIVE, UserError, experiment_name
from utils.data import CLASSES, Split, normalize, stratified_indices
from utils.networks import Network
from utils.routers import ROUTERS, BudgetError, StudentOutputs, build_router

STUDENT_HINT = "python StudentTrain.py --model 1 2"


def add_routing_args(parser):
    """The experiment, its checkpoints and the routed system's policy: what inference.py and predict.py share."""
    parser.add_argument("--name", default="", type=experiment_name,
                        help="experiment name: read checkpoints/NAME/, write results/NAME/ (default: checkpoints/, "
                             "results/)")
    parser.add_argument("--students", nargs="+", default=None,
                        help="student checkpoints, in the order the selector was trained for (default: "
                             "checkpoints/[NAME/]student_densenet121.pt and student_googlenet.pt)")
    parser.add_argument("--selector", default=None,
                        help="selector checkpoint (default: checkpoints/[NAME/]selector.pt)")
    parser.add_argument("--router", default="cascade", choices=list(ROUTERS),
                        help="the routing policy of the routed system")
    parser.add_argument("--budget", type=POSITIVE, default=1.25,
                        help="compute budget of the routed system: at most this many times the cheapest student's "
                             "GFLOPs per image on the hold-out split (a budget below the cheapest system is refused, "
                             "naming the least that fits)")


def students_split(paths):
    """The ``Split`` the students share; refused if they differ."""
    splits = [Split.of(load_checkpoint(path, hint=STUDENT_HINT, kind="student")) for path in paths]
    for path, split in zip(paths[1:], splits[1:]):
        if split != splits[0]:
            raise UserError(f"{paths[0]} and {path} were trained on different splits ({splits[0]} and {split}); "
                            "train both students with the same --holdout, --split-seed and --limit")
    return splits[0]


def load_students(paths, runtime, name=""):
    """The students as ``Network``s, in routing order."""
    if len(paths) < 2:
        raise UserError(f"the selector chooses between at least 2 students; --students gave {len(paths)}")
    hint = STUDENT_HINT + (f" --name {name}" if name else "")
    return [Network(path, "student", hint, runtime, role=f"Student {k}") for k, path in enumerate(paths, 1)]


def student_record(students):
    """What a selector checkpoint remembers of the students (``Network``s) it was trained for."""
    return [{"path": s.path, "arch": s.arch, "weights_sha256": s.checkpoint["weights_sha256"]} for s in students]


def check_selector_students(selector_checkpoint, selector_path, students):
    """Refuse a selector paired with students other than those it was trained for."""
    expected = selector_checkpoint["students"]
    found = student_record(students)
    if [s["weights_sha256"] for s in expected] != [s["weights_sha256"] for s in found]:
        wanted = " ".join(s["path"] for s in expected)
        raise UserError(f"{selector_path} was trained for other students ({wanted}, in that order); pass those "
                        "with --students, or retrain it with `python trainSelector.py`")


def check_out_of_fold(checkpoint, path):
    """Refuse a selector without out-of-fold hold-out scores: its routing would be fitted on images it trained on."""
    if "cross_fit" not in checkpoint:
        raise UserError(f"{path} has no out-of-fold hold-out scores (an older trainSelector.py trained it on part of "
                        "the hold-out split its routing is fitted on); retrain it with `python trainSelector.py "
                        "--force`")


def load_selector(path, students, runtime, role="Selector", name=""):
    """The selector as a ``Network`` whose hold-out logits are its out-of-fold scores; refused if it was trained
    for other students or without them. ``name``: the experiment, for the command a refusal names."""
    hint = "python trainSelector.py" + (f" --name {name}" if name else "")
    selector = Network(path, "selector", hint, runtime, role=role)
    check_selector_students(selector.checkpoint, path, students)
    check_out_of_fold(selector.checkpoint, path)
    return selector


def validation_mask(labels, fraction, seed):
    """A stratified ``fraction`` of the images of ``labels``, fixed by ``seed``: the images a selector keeps out of
    its training to choose its epoch."""
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[stratified_indices(labels, max(1, round(fraction * len(labels))), seed)] = True
    return mask


def check_folds(labels, folds, what="the selector's hold-out split"):
    """Refuse ``folds`` that some class of ``labels`` cannot fill: every fold must hold every class."""
    counts = torch.bincount(labels, minlength=len(CLASSES))
    present = counts[counts > 0]
    if len(present) and present.min() < folds:
        scarce = CLASSES[(counts == present.min()).nonzero()[0].item()]
        raise UserError(f"--folds {folds} needs at least {folds} images of every class in {what}, which has "
                        f"{present.min().item()} of class '{scarce}'; give --folds {max(2, present.min().item())}"
                        " or fewer, or a larger --holdout (or --limit) for the students")


def out_of_fold(fold, score_fold):
    """Per image, the scores of a model that never trained on it.

    ``fold`` ``(N,)`` gives each image's fold (0 to K - 1); ``score_fold(k, held_out)`` trains a model
    on the images outside fold k (``held_out`` is the mask of fold k) and returns its scores on the
    images of fold k, in order.
    """
    scores = None
    for k in range(int(fold.max()) + 1):
        held_out = fold == k
        fold_scores = score_fold(k, held_out)
        if scores is None:
            scores = fold_scores.new_zeros(len(fold), *fold_scores.shape[1:])
        scores[held_out] = fold_scores
    return scores


def outputs_of(networks, selector, split):
    """``(StudentOutputs, labels)`` of a split from the networks' logits (``Network.load_logits``, or a bundle's),
    with the selector's scores if a selector is given (out-of-fold on the hold-out split); refused if the
    networks were evaluated on different images."""
    logits = [net.logits[split] for net in networks]
    labels = logits[0][1]
    for net, (_, other) in zip(networks[1:], logits[1:]):
        if not torch.equal(other, labels):
            raise UserError(f"{net.path} was evaluated on other {split} images than {networks[0].path}; train every "
                            "network of an experiment on the same split (--holdout, --split-seed, --limit)")
    scores = selector.logits[split][0] if selector else None
    return StudentOutputs(torch.stack([network_logits for network_logits, _ in logits], 1), scores), labels


def build_for(name, students, selector=None, teacher=None):
    """The ``name`` router, unfitted, over the students cheapest first (GFLOPs measured) — then the teacher, as the
    last resort of a cascade, if given — charged the selector's GFLOPs where it reads its scores."""
    networks = [*students, *([teacher] if teacher else [])]
    flops = [net.gflops for net in networks]
    order = sorted(range(len(students)), key=lambda k: flops[k]) + ([len(students)] if teacher else [])
    router = build_router(name, flops=flops, router_flops=selector.gflops if selector else 0.0, order=order)
    if teacher and router.uses_selector:
        raise ValueError(f"the {name} router chooses among the students the selector scores, not the teacher")
    return router


def fit_router(name, budget, students, selector, teacher=None):
    """A router fitted on the whole hold-out split, where the selector's scores are out-of-fold: each image's from
    a selector that never trained on it. ``teacher``: the cascade's last resort. A budget no threshold meets is a
    ``BudgetError``."""
    router = build_for(name, students, selector, teacher)
    networks = [*students, *([teacher] if teacher else [])]
    holdout, labels = outputs_of(networks, selector if router.uses_selector else None, "holdout")
    if len(labels) == 0:
        raise UserError("the students were trained with --holdout 0: there is no hold-out split to fit routing on")
    return router.fit(holdout, labels, budget)


def try_fit(name, budget, students, selector, teacher=None):
    """``fit_router``, or None where no threshold meets ``budget``; any other error goes through."""
    try:
        return fit_router(name, budget, students, selector, teacher)
    except BudgetError:
        return None


def fit_headline(name, budget, students, selector):
    """``fit_router`` for the system asked for by ``--router`` and ``--budget``; a budget below the cheapest such
    system is refused in one line that names the least budget it meets."""
    try:
        return fit_router(name, budget, students, selector)
    except BudgetError as e:
        ratio = e.cheapest_gflops / min(s.gflops for s in students)
        least = math.ceil(round(100 * ratio, 6)) / 100
        raise UserError(f"--budget {budget:g} is below the cheapest {name} system: on the hold-out split it costs "
                        f"{e.cheapest_gflops:.3f} GFLOPs per image, {ratio:.3f}x the cheapest student's; give "
                        f"--budget {least:g} or more") from None


@torch.no_grad()
def run_routed(router, networks, selector, x, num_classes):
    """A fitted router's system on the batch ``x``, running each network only where the router needs it.

    The selector runs first, on every image, if the router reads it; then, round after round, the
    networks ``router.needs`` given what has run (a cascade: its next network, on the images still
    unsure). Returns the router's ``Routing``.
    """
    n = len(x)
    logits = torch.zeros(n, len(networks), num_classes, device=x.device)
    scores = selector(x).float() if router.uses_selector else None
    known = torch.zeros(n, len(networks), dtype=torch.bool, device=x.device)
    while True:
        wanted = router.needs(StudentOutputs(logits, scores), known) & ~known
        if not wanted.any():
            return router.route(StudentOutputs(logits, scores))
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
