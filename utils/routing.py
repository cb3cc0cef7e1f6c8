"""Students and the selector together: loading, scoring, selector labels, routed prediction and its timing."""

import time

import torch

from utils.checkpoint import load_checkpoint
from utils.cli import POSITIVE, UserError, experiment_name
from utils.data import Split, normalize, stratified_indices
from utils.networks import Network
from utils.routers import ROUTERS, StudentOutputs, build_router

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
                        help="compute budget of the routed system: at most this many times the cheaper student's "
                             "GFLOPs per image on the hold-out split")


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


def load_selector(path, students, runtime, role="Selector"):
    """The selector as a ``Network``, refused if it was trained for other students."""
    selector = Network(path, "selector", "python trainSelector.py", runtime, role=role)
    check_selector_students(selector.checkpoint, path, students)
    return selector


def validation_mask(labels, fraction, seed):
    """The selector's validation images among the hold-out ``labels``: a stratified ``fraction``, fixed by ``seed``.

    The selector never trains on them, so they are where its routing is fitted and judged.
    """
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[stratified_indices(labels, max(1, round(fraction * len(labels))), seed)] = True
    return mask


def outputs_of(students, selector, split, mask=None):
    """``(StudentOutputs, labels)`` of a split from the networks' cached logits (``Network.load_logits``),
    with the selector's scores if a selector is given; ``mask`` keeps some images only."""
    logits = torch.stack([s.logits[split][0] for s in students], 1)
    scores = selector.logits[split][0] if selector else None
    labels = students[0].logits[split][1]
    if mask is not None:
        logits, labels, scores = logits[mask], labels[mask], None if scores is None else scores[mask]
    return StudentOutputs(logits, scores), labels


def fit_router(name, budget, students, selector):
    """A router fitted on the hold-out split; the selector's routing on its validation images only."""
    flops = [s.gflops for s in students]
    cheap = min(range(len(students)), key=lambda k: flops[k])
    order = (cheap, min((k for k in range(len(students)) if k != cheap), key=lambda k: flops[k]))
    router = build_router(name, flops=flops, router_flops=selector.gflops if selector else 0.0, order=order)
    holdout, labels = outputs_of(students, selector if router.uses_selector else None, "holdout")
    if len(labels) == 0:
        raise UserError("the students were trained with --holdout 0: there is no hold-out split to fit routing on")
    if router.uses_selector:
        mask = validation_mask(labels, selector.checkpoint["config"]["val_fraction"], selector.split.split_seed)
        holdout, labels = outputs_of(students, selector, "holdout", mask)
    return router.fit(holdout, labels, budget)


def try_fit(name, budget, students, selector):
    """``fit_router``, or None where no threshold fits ``budget``."""
    try:
        return fit_router(name, budget, students, selector)
    except ValueError:  # no threshold fits this budget
        return None


@torch.no_grad()
def run_routed(router, students, selector, x, num_classes):
    """A fitted router's system on the batch ``x``, running each network only where the router needs it.

    The students that both of the router's options run go first, on every image (with the selector,
    if the router reads it); the score decides the rest. Returns the router's ``Routing``.
    """
    n = len(x)
    logits = torch.zeros(n, len(students), num_classes, device=x.device)
    scores = selector(x).float() if router.uses_selector else None
    keep, switch = (option.ran[0] for option in router.options(
        StudentOutputs(logits[:1], None if scores is None else scores[:1])))
    for k in (keep & switch).nonzero().flatten().tolist():
        logits[:, k] = students[k](x).float()
    switched = router.score(StudentOutputs(logits, scores)) > router.threshold_
    for k, mask in [(k, ~switched) for k in (keep & ~switch).nonzero().flatten().tolist()] + \
                   [(k, switched) for k in (switch & ~keep).nonzero().flatten().tolist()]:
        idx = mask.nonzero().flatten()
        if len(idx):
            logits[idx, k] = students[k](x[idx]).float()
    return router.route(StudentOutputs(logits, scores))


@torch.no_grad()
def batched_routed(router, students, selector, images, runtime, batch_size=1024, num_classes=10):
    """``run_routed`` over uint8 ``images`` in batches: ``(probs (N, C), ran (N, S))`` on the device."""
    probs, ran = [], []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(runtime.device), runtime.cuda)
        with runtime.autocast:
            routing = run_routed(router, students, selector, x, num_classes)
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
