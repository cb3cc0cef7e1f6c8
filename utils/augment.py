"""Batched, seeded augmentation on the device: translate and flip, Cutout, CutMix/MixUp, and test-time views.

Every random function draws only from the ``torch.Generator`` it is given (on the images'
device), so the same generator state gives the same batch: a run resumed mid-epoch
sees exactly the augmentation it would have seen.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CIFAR10_MEAN_PIXEL = (125, 123, 114)  # round(255 * utils.data.MEAN): cut-out squares normalise to ~0
MIXERS = {"cutmix": ("CutMix",), "mixup": ("MixUp",), "both": ("CutMix", "MixUp")}  # of torchvision's v2


def random_translate_flip(images, generator, pad=4, padding_mode="reflect"):
    """Translate each image of a uint8 batch by up to ``pad`` pixels and mirror half of them, as one gather.

    ``padding_mode`` fills the uncovered border: ``"reflect"`` mirrors the image,
    ``"zeros"`` (or ``"constant"``) is black: the classic CIFAR crop with 4-pixel zero padding.
    """
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad), mode="constant" if padding_mode == "zeros" else padding_mode)
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=device, generator=generator)
    rows = dy + torch.arange(h, device=device)
    cols = dx + torch.arange(w, device=device)
    flip = torch.rand(b, 1, device=device, generator=generator) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    return padded[torch.arange(b, device=device).view(b, 1, 1, 1), torch.arange(c, device=device).view(1, c, 1, 1),
                  rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


@functools.cache
def _fill_value(fill, dtype, device):
    """Made once per device, like ``utils.data.normalize``'s mean: no host-to-device copy per batch."""
    return torch.tensor(fill, dtype=dtype, device=device).view(-1, 1, 1)


def cutout(images, generator, size=12, fill=CIFAR10_MEAN_PIXEL):
    """Paint one ``size`` x ``size`` square per image of a uint8 batch with ``fill`` (DeVries & Taylor, 2017).

    The square's centre is uniform over the image, so the border may cut the square.
    The default ``fill`` is the CIFAR-10 mean pixel, so after ``normalize`` the square is ~0,
    as in the paper, which cuts out of normalised images. ``fill`` is one value, or a tuple
    of one per channel.
    """
    b, _, h, w = images.shape
    device = images.device
    top = torch.randint(0, h, (b, 1), device=device, generator=generator) - size // 2
    left = torch.randint(0, w, (b, 1), device=device, generator=generator) - size // 2
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows >= top) & (rows < top + size)
    in_cols = (cols >= left) & (cols < left + size)
    square = in_rows.view(b, 1, h, 1) & in_cols.view(b, 1, 1, w)
    return torch.where(square, _fill_value(fill, images.dtype, device), images)


def mix(images, labels, seed, kind="cutmix", alpha=1.0, num_classes=10, p=1.0):
    """CutMix, MixUp or either (``kind="both"``) of a batch, with probability ``p``; torchvision's transforms.

    Each image is mixed with the one before it in the batch (torchvision's pairing), so the
    batch must be shuffled. ``images`` is a float batch (MixUp cannot mix integers), in any
    memory format, on any device; ``labels`` are class indices ``(B,)`` or soft targets
    ``(B, num_classes)``. ``seed`` is an int or a ``torch.Generator``; a CUDA generator costs
    one synchronisation to read a seed from it. Returns the mixed images and soft targets
    ``(B, num_classes)`` that sum to 1 (one-hot ones when the batch is left unmixed).
    """
    from torchvision.transforms import v2  # here: torchvision takes seconds to import, and only mixing needs it

    if kind not in MIXERS:
        raise ValueError(f"mix kind must be one of {', '.join(MIXERS)}, not {kind!r}")
    if not images.is_floating_point():
        raise TypeError(f"mix needs float images (MixUp averages pixels), not {images.dtype}")
    if isinstance(seed, torch.Generator):
        seed = int(torch.randint(2**62, (), device=seed.device, generator=seed))
    mixer = v2.RandomChoice([getattr(v2, m)(alpha=alpha, num_classes=num_classes) for m in MIXERS[kind]])
    # torchvision draws all its parameters from the global CPU generator (even for CUDA
    # images), so seeding and restoring that one generator makes the transform reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        if torch.rand(()) < p:
            return mixer(images, labels)
    targets = F.one_hot(labels, num_classes) if labels.dim() == 1 else labels
    return images, targets.float()


def _shift_diagonally(x, d):
    """``x`` moved ``d`` pixels down and right (up and left when ``d`` < 0), the uncovered border reflected."""
    if d == 0:
        return x
    t, (h, w) = abs(d), x.shape[-2:]
    padded = F.pad(x, (t, t, t, t), mode="reflect")
    return padded[..., t - d:t - d + h, t - d:t - d + w]


def tta_logits(model, x, translations=0):
    """Mean float32 logits over ``x``, its mirror and, when ``translations`` > 0, both moved diagonally by that
    many pixels.

    ``x`` is the normalised float batch. The translations are the two diagonal shifts
    ``+-translations`` (reflect padding), as in airbench: 6 forward passes for
    ``translations=1``; with ``translations=0`` this is the flip TTA
    ``(model(x) + model(x.flip(3))) / 2`` exactly. Each view's logits are made float32 before they are
    summed: under bf16 autocast, summing them in bf16 would round away differences that decide the argmax.
    """
    moved = [_shift_diagonally(x, d) for d in ((0, translations, -translations) if translations else (0,))]
    views = [view for m in moved for view in (m, m.flip(3))]
    return sum(model(view).float() for view in views) / len(views)


TTA_VIEWS = {"none": 1, "flip": 2, "flip-shift": 6}  # forward passes per image


def predict(model, x, tta="none"):
    """Float32 logits of ``model`` for the normalised batch ``x``, averaged over the views of ``tta`` (see
    ``TTA_VIEWS``)."""
    if tta == "none":
        return model(x).float()
    return tta_logits(model, x, translations=1 if tta == "flip-shift" else 0)


@dataclass(frozen=True)
class Augmentation:
    """A training batch's augmentation: translate and flip, Cutout, then CutMix/MixUp; from the flags.

    ``translate=4, padding="zeros"`` with nothing else is the classic CIFAR crop and flip.
    """

    translate: int = 4
    padding: str = "reflect"
    cutout: int = 0
    mix: str = "none"
    mix_alpha: float = 1.0
    mix_prob: float = 1.0
    num_classes: int = 10

    @classmethod
    def from_args(cls, args, num_classes=10):
        return cls(args.translate, args.padding, args.cutout, args.mix, args.mix_alpha, args.mix_prob, num_classes)

    def images(self, images, generator):
        """The uint8 batch translated, flipped and cut out."""
        images = random_translate_flip(images, generator, self.translate, self.padding)
        return cutout(images, generator, self.cutout) if self.cutout else images

    def mix_batch(self, x, targets, seed):
        """The normalised batch and its targets, mixed (soft targets) when ``mix`` asks for it."""
        if self.mix == "none":
            return x, targets
        return mix(x, targets, seed, self.mix, self.mix_alpha, self.num_classes, self.mix_prob)
