"""Trained networks as a results bundle knows them: each one's checkpoint record (no weights), its cost and its
logits, and an experiment's networks by role, with the checks that they belong together.

This is all that routing and the tables need, so re-analysing a bundle needs neither weights nor
torchvision; ``utils.networks.Network`` is a ``Trained`` with its weights.
"""

import functools
from dataclasses import dataclass, field

from utils.augment import TTA_VIEWS
from utils.cli import UserError
from utils.policies import fit_temperature
from utils.split import Split

# What a checkpoint holds besides its record: its weights, the hold-out logits it carries, an unfinished run's state.
NOT_RECORDED = ("model", "optimizer", "ema", "rng", "cuda_rng", "rank_rngs", "sums", "history", "holdout_logits",
                "holdout_labels")


class Trained:
    """A trained network as its checkpoint's record (no weights), its parameters and FLOPs per plain forward
    pass, and its logits ``{"holdout", "test"} -> (logits (N, K), labels (N,))`` once known.

    ``role`` names it in tables (``"Student 1"``).
    """

    def __init__(self, role, path, checkpoint, params=None, flops=None, logits=None):
        self.role, self.path, self.checkpoint, self.logits = role, str(path), checkpoint, logits
        self._params, self._flops = params, flops
        self.tta = checkpoint.get("config", {}).get("tta", "none")
        self.split = Split.of(checkpoint) if "split" in checkpoint else None

    @property
    def stats(self):
        return {"params": self._params, "flops": self._flops}

    @property
    def gflops(self):
        """GFLOPs per 32x32 image, test-time views included."""
        return self.stats["flops"] / 1e9 * TTA_VIEWS[self.tta]

    @property
    def arch(self):
        return self.checkpoint["arch"]

    @functools.cached_property
    def temperature(self):
        """The temperature T that calibrates ``softmax(logits / T)`` on the hold-out split: fitted once, for every
        routing policy that averages or thresholds its probabilities."""
        logits, labels = self.logits["holdout"]
        return fit_temperature(logits[:, None], labels)[0]

    @property
    def progress(self):
        """``"3/40"``: the epochs its run had done when the checkpoint was saved, of those it was to run."""
        return f"{self.checkpoint.get('epochs_run', self.checkpoint['epoch'])}/{self.checkpoint['epochs']}"

    @property
    def label(self):
        """``Student 1 densenet121 (KD)``, ``Specialist 1 densenet121 (KD, mcl)``, ``Teacher resnet50 [unfinished:
        3/40 epochs]``, ``Selector``."""
        kd = {True: " (KD)", False: " without KD"}.get(self.checkpoint.get("kd"), "")
        if self.checkpoint.get("specialist"):
            kd = f" ({'KD, ' if self.checkpoint.get('kd') else ''}{self.checkpoint['specialist']['method']})"
        done = "" if self.checkpoint.get("complete") else f" [unfinished: {self.progress} epochs]"
        arch = "" if self.checkpoint["kind"] == "selector" else f" {self.arch}"
        return f"{self.role}{arch}{kd}{done}"

    def record(self):
        """What a results bundle keeps of it (JSON): everything but the weights and its logits."""
        return {"role": self.role, "path": self.path, "params": self.stats["params"], "flops": self.stats["flops"],
                "checkpoint": {k: v for k, v in self.checkpoint.items() if k not in NOT_RECORDED}}

    @classmethod
    def from_record(cls, record, logits):
        return cls(record["role"], record["path"], record["checkpoint"], record["params"], record["flops"], logits)


@dataclass
class Networks:
    """An experiment's networks (``Trained``, with their logits) by role: the generalist students with their no-KD
    twins, selector and control; and a method's specialists with theirs, where the experiment has them."""

    teacher: Trained
    students: list
    twins: list  # the students' no-KD twins that exist
    selector: Trained
    control: Trained | None  # the selector trained on shuffled labels, if it exists
    specialists: list = field(default_factory=list)
    spec_selector: Trained | None = None
    spec_control: Trained | None = None

    def by_id(self):
        """``[(identifier, network)]`` in the order of ``iter``: ``teacher``, ``student1``..., ``nokd1``... (the
        number of the student it is the twin of), ``selector``, ``control``, ``spec1``..., ``spec_selector``,
        ``spec_control``."""
        twins = [f"nokd{self.students.index(self.student_of(twin)) + 1}" for twin in self.twins]
        everyone = [("teacher", self.teacher), *((f"student{k}", s) for k, s in enumerate(self.students, 1)),
                    *zip(twins, self.twins), ("selector", self.selector), ("control", self.control),
                    *((f"spec{k}", s) for k, s in enumerate(self.specialists, 1)),
                    ("spec_selector", self.spec_selector), ("spec_control", self.spec_control)]
        return [(k, net) for k, net in everyone if net is not None]

    def __iter__(self):
        return iter([net for _, net in self.by_id()])

    def ids(self):
        return [k for k, _ in self.by_id()]

    def student_of(self, twin):
        """The student a no-KD twin is the twin of: the one of the same architecture."""
        return next(s for s in self.students if s.arch == twin.arch)

    def layout(self):
        """Where each role sits in ``list(self)``: how a bundle remembers them."""
        where = {id(net): k for k, net in enumerate(self)}

        def at(net):
            return None if net is None else where[id(net)]
        return {"teacher": 0, "students": [at(s) for s in self.students], "twins": [at(t) for t in self.twins],
                "selector": at(self.selector), "control": at(self.control),
                "specialists": [at(s) for s in self.specialists], "spec_selector": at(self.spec_selector),
                "spec_control": at(self.spec_control)}

    @classmethod
    def from_layout(cls, networks, layout):
        """The inverse of ``layout``; a bundle written before specialists existed has none."""
        def at(key):
            return None if layout.get(key) is None else networks[layout[key]]
        return cls(networks[layout["teacher"]], [networks[k] for k in layout["students"]],
                   [networks[k] for k in layout["twins"]], at("selector"), at("control"),
                   [networks[k] for k in layout.get("specialists", [])], at("spec_selector"), at("spec_control"))


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
        raise UserError(f"{path} has no out-of-fold hold-out scores (its selector was trained on part of the "
                        "hold-out split its routing is fitted on); retrain it with `python trainSelector.py --force`")
