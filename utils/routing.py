"""Students and the selector together: loading, scoring, selector labels, routed prediction and its timing."""

import time

import torch

from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.cli import UserError
from utils.data import normalize, stratified_indices
from utils.engine import prepare_model
from utils.routers import StudentOutputs
from utils.runs import default_checkpoint

STUDENT_HINT = "python StudentTrain.py --model 1 (and --model 2)"
DEFAULT_STUDENT_ARCHS = ("densenet121", "googlenet")


def default_students(name=""):
    """The two default student checkpoints of experiment ``name``."""
    return [default_checkpoint(name, f"student_{arch}") for arch in DEFAULT_STUDENT_ARCHS]


def students_split(paths):
    """The hold-out split (``{"holdout", "split_seed", "limit"}``) the students share; refused if they differ."""
    splits = [load_checkpoint(path, hint=STUDENT_HINT, kind="student")["split"] for path in paths]
    for path, split in zip(paths[1:], splits[1:]):
        if split != splits[0]:
            raise UserError(f"{paths[0]} and {path} were trained on different splits ({splits[0]} and {split}); "
                            "train both students with the same --holdout, --split-seed and --limit")
    return splits[0]


def load_classifier(path, kind, hint, runtime):
    """``(model on the device in eval mode, checkpoint)`` for a teacher or student checkpoint."""
    checkpoint = load_checkpoint(path, hint=hint, kind=kind)
    model = model_from_checkpoint(checkpoint, path, hint).eval().requires_grad_(False)
    return prepare_model(model, runtime), checkpoint


def load_students(paths, runtime):
    if len(paths) < 2:
        raise UserError(f"the selector chooses between at least 2 students; --students gave {len(paths)}")
    return [load_classifier(path, "student", STUDENT_HINT, runtime) for path in paths]


def student_record(paths, checkpoints):
    """What a selector checkpoint remembers of the students it was trained for."""
    return [{"path": str(p), "arch": c["arch"], "weights_sha256": c["weights_sha256"]}
            for p, c in zip(paths, checkpoints)]


def check_selector_students(selector_checkpoint, selector_path, paths, checkpoints):
    """Refuse a selector paired with students other than those it was trained for."""
    expected = selector_checkpoint["students"]
    found = student_record(paths, checkpoints)
    if [s["weights_sha256"] for s in expected] != [s["weights_sha256"] for s in found]:
        wanted = " ".join(s["path"] for s in expected)
        raise UserError(f"{selector_path} was trained for other students ({wanted}, in that order); pass those "
                        "with --students, or retrain it with `python trainSelector.py`")


@torch.no_grad()
def batched_logits(model, images, runtime, batch_size=1024):
    """Logits (float32, on the device) of ``model`` for uint8 ``images``, in order."""
    channels_last = runtime.device.type == "cuda"
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(runtime.device), channels_last)
        with runtime.autocast:
            out.append(model(x).float())
    return torch.cat(out)


def validation_mask(labels, fraction, seed):
    """The selector's validation images among the hold-out ``labels``: a stratified ``fraction``, fixed by ``seed``.

    The selector never trains on them, so they are where its routing is fitted and judged.
    """
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[stratified_indices(labels, max(1, round(fraction * len(labels))), seed)] = True
    return mask


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
    channels_last = runtime.device.type == "cuda"
    probs, ran = [], []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(runtime.device), channels_last)
        with runtime.autocast:
            routing = run_routed(router, students, selector, x, num_classes)
        probs.append(routing.probs)
        ran.append(routing.ran)
    return torch.cat(probs), torch.cat(ran)


def timed(fn, runtime):
    """``(result, seconds)`` of the second of two calls of ``fn()``: the same on every device.

    The first, untimed call sees every batch shape once, so neither cuDNN's kernel search nor
    any other first-call cost is timed.
    """
    fn()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    start = time.perf_counter()
    result = fn()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    return result, time.perf_counter() - start
