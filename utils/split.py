"""CIFAR-10's classes and splits: which images each split holds (the hold-out split of the training set, a
stratified limit), and checks of the flags that choose them.

Plain Python, so that a command line's split flags are checked before torch is imported.
"""

from dataclasses import dataclass

from utils.cli import UserError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_SIZE, TEST_SIZE = 50_000, 10_000  # the official split sizes


@dataclass(frozen=True)
class Split:
    """Which images each split holds: ``holdout`` training images held out (stratified, drawn with
    ``split_seed``), and at most ``limit`` images of every split (0: all). Every stage of an
    experiment must use the same one; a checkpoint records it as ``checkpoint["split"]``."""

    holdout: int = 5000
    split_seed: int = 0
    limit: int = 0

    @classmethod
    def of(cls, checkpoint):
        """The split a checkpoint was trained on."""
        return cls(**checkpoint["split"])

    @classmethod
    def from_args(cls, args):
        return cls(args.holdout, args.split_seed, args.limit)

    def as_dict(self):
        return {"holdout": self.holdout, "split_seed": self.split_seed, "limit": self.limit}

    def __str__(self):
        return f"--holdout {self.holdout} --split-seed {self.split_seed} --limit {self.limit}"

    def planned_sizes(self, train_size=TRAIN_SIZE, test_size=TEST_SIZE):
        """``{"train", "holdout", "test"}`` -> number of images ``make_splits`` will give, known before decoding."""
        sizes = {"train": train_size - self.holdout, "holdout": self.holdout, "test": test_size}
        return {name: min(n, self.limit) if self.limit else n for name, n in sizes.items()}


def stratified_counts(n, classes=len(CLASSES)):
    """Images of each class in a stratified draw of ``n`` (``utils.data.stratified_indices``): the first ``n %
    classes`` classes one more."""
    return [n // classes + (k < n % classes) for k in range(classes)]


def check_folds(counts, folds, what="the selector's hold-out split"):
    """Refuse ``folds`` that some class cannot fill, from the images of each class (``counts``): every fold must
    hold every class."""
    present = [c for c in counts if c > 0]
    if present and min(present) < folds:
        scarce = CLASSES[counts.index(min(present))]
        raise UserError(f"--folds {folds} needs at least {folds} images of every class in {what}, which has "
                        f"{min(present)} of class '{scarce}'; give --folds {max(2, min(present))} or fewer, or a "
                        "larger --holdout (or --limit) for the students")
