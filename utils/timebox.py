"""Time as an input: how many epochs fit a wall-clock budget, and how a budget is shared.

A ``TimeBox`` is when a stage began and how long it may take. ``utils.engine`` measures a few
real steps, a hold-out evaluation and a save (``Costs``); ``plan_epochs`` then chooses the most
epochs whose steps, evaluations and saves, the final test evaluation and a safety share end
inside the box, and the schedule is built for them, so a time-boxed run ends on a rate of 0 and
is a complete run that ``--epochs N`` repeats. ``share`` is a box's part of a larger one: each
selector's of its stage (``trainSelector.py``), each stage's of the pipeline (``reproduce.py``).
"""

import contextlib
import contextvars
import math
import time
from dataclasses import dataclass

from utils.cli import UserError

SAFETY_SHARE = 0.03  # of a time box, kept back for what the measurements cannot see
SUGGESTION_MARGIN = 1.25  # a refusal suggests this much more than one epoch needed here, for a rerun's own start-up


@dataclass(frozen=True)
class TimeBox:
    """When a stage began (``time.time()``) and how many seconds it may take in all (None: no limit).

    ``share``: for a box that is a share of the user's ``--minutes`` (one of several fits), how a refusal names
    it and what it advises instead of a larger ``--minutes``. ``at_least_one``: a box too short for one epoch
    trains one anyway, and says by how much it will run over, instead of refusing: for a fit that follows
    others in the same stage, whose work a refusal would waste.
    """

    started: float
    seconds: float | None = None
    share: tuple | None = None  # (what the box is, the advice), e.g. ("1/6 of --minutes 0.5", "give more ...")
    at_least_one: bool = False

    @classmethod
    def of(cls, minutes, started=None):
        """A box of ``minutes`` (None: no limit), starting now or at ``started``."""
        return cls(time.time() if started is None else started, None if minutes is None else 60 * minutes)

    def elapsed(self):
        return time.time() - self.started

    def left(self):
        return self.seconds - self.elapsed()


@dataclass(frozen=True)
class Costs:
    """What a stage measured of itself: seconds per training step, per epoch of steps, per hold-out evaluation,
    per save (resume state and best weights) and for the final test evaluation; images per step."""

    step_seconds: float
    epoch_seconds: float
    eval_seconds: float
    save_seconds: float
    test_seconds: float
    images_per_step: int


def evaluated_epoch(epoch, epochs, every):
    """Whether epoch ``epoch`` (from 0) is evaluated on the hold-out split: every ``every`` epochs, and each of
    the last ``every`` (where the best weights of a decaying schedule are)."""
    return (epoch + 1) % every == 0 or epoch >= epochs - every


def evaluations(epochs, every):
    """How many of ``epochs`` epochs ``evaluated_epoch`` evaluates: the last ``every`` (all of a shorter run), and
    every ``every``-th before them."""
    return epochs if epochs < every else epochs // every + every - 1


def run_seconds(epochs, epoch_seconds, eval_seconds, save_seconds, eval_every, save_every):
    """Seconds of ``epochs`` epochs' steps, hold-out evaluations and saves (every ``save_every`` minutes, or every
    epoch with 0)."""
    saves = 1 + epochs * epoch_seconds / (60 * save_every) if save_every else epochs
    return epochs * epoch_seconds + evaluations(epochs, eval_every) * eval_seconds + saves * save_seconds


def choose_epochs(seconds, epoch_seconds, eval_seconds, save_seconds, eval_every, save_every):
    """The most epochs whose ``run_seconds`` fit in ``seconds``: a search over a cost that grows with the epochs,
    in as many steps as the answer has bits."""
    def fits(epochs):
        return run_seconds(epochs, epoch_seconds, eval_seconds, save_seconds, eval_every, save_every) <= seconds

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:  # low fits, high does not
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


_PIPELINE_SHARE = contextvars.ContextVar("pipeline_share", default=None)


@contextlib.contextmanager
def pipeline_share(what, fraction, command):
    """Within it, a stage's time box is ``fraction`` of a pipeline's ``--minutes`` (``what`` names it): a box too short
    for one epoch is refused naming the ``--minutes`` of the pipeline's ``command`` that fits."""
    token = _PIPELINE_SHARE.set((what, fraction, command))
    try:
        yield
    finally:
        _PIPELINE_SHARE.reset(token)


def _refusal_names(time_box, needed):
    """``(what the box is, the advice)`` of a refusal: the box's own words, a pipeline's, or ``--minutes``'s."""
    if time_box.share:
        return time_box.share
    pipeline = _PIPELINE_SHARE.get()
    if pipeline:
        what, fraction, command = pipeline
        suggested = math.ceil(SUGGESTION_MARGIN * needed / fraction / 60 * 100) / 100
        return what, f"give {command} --minutes {suggested:g} or more"
    suggested = math.ceil(SUGGESTION_MARGIN * needed / 60 * 100) / 100
    return f"--minutes {time_box.seconds / 60:g}", f"give --minutes {suggested:g} or more"


def plan_epochs(costs, time_box, eval_every, save_every, agree=int, announce=True):
    """The plan of a time-boxed stage: the most epochs that end it inside ``time_box``, with what was measured.

    ``agree`` makes every process of a ``torchrun`` job take the same number (the smallest). A box too
    short for one epoch is refused in one line naming the ``--minutes`` that fits, or trains one epoch
    anyway where the box says so (``at_least_one``, said when ``announce``).
    """
    left = time_box.left() - SAFETY_SHARE * time_box.seconds - costs.test_seconds - 2 * costs.save_seconds
    epochs = agree(choose_epochs(left, costs.epoch_seconds, costs.eval_seconds, costs.save_seconds, eval_every,
                                 save_every))
    if epochs == 0:
        needed = time_box.elapsed() + costs.epoch_seconds + costs.eval_seconds + costs.test_seconds \
            + 3 * costs.save_seconds
        needed /= 1 - SAFETY_SHARE
        what, advice = _refusal_names(time_box, needed)
        if not time_box.at_least_one:
            raise UserError(f"{what} is too short: one epoch takes about {costs.epoch_seconds:.3g} s here, and this "
                            f"stage needs at least {needed / 60:.2f} minutes for one; {advice}")
        epochs, left = 1, needed - time_box.elapsed()
        if announce:
            print(f"note: {what} is too short for one epoch; training one, about "
                  f"{needed - time_box.seconds:.3g} s over it")
    return {"minutes": time_box.seconds / 60, "epochs": epochs, "step_seconds": costs.step_seconds,
            "images_per_s": costs.images_per_step / costs.step_seconds, "holdout_eval_seconds": costs.eval_seconds,
            "planned_seconds": time_box.elapsed() + left}


def share(whole, parts_left, what, advice, overrun=0.0, at_least_one=False):
    """The box of the next of ``parts_left`` fits that share what is left of ``whole``: an equal part, less
    ``overrun`` (the most by which an earlier part outlasted its box). ``what`` and ``advice`` name it in a
    refusal; ``at_least_one``: see ``TimeBox``."""
    return TimeBox(time.time(), max(whole.left() / parts_left - overrun, 0.0), share=(what, advice),
                   at_least_one=at_least_one)


def weighted_minutes(deadline, weights, title, to_run):
    """Minutes for the stage ``title`` of a pipeline that ends at ``deadline`` (``time.time()``): its ``weights``
    share of the time left, among the stages ``to_run`` that still have to (at least a second)."""
    left = deadline - time.time()
    return max(left * weights[title] / sum(weights[t] for t in to_run), 1.0) / 60
