"""Augmentation: each image stays with its label, seeds reproduce batches, mixed targets match the pixels."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from utils.augment import (
    CIFAR10_MEAN_PIXEL,
    TTA_VIEWS,
    Augmentation,
    cutout,
    mix,
    predict,
    random_translate_flip,
    tta_logits,
)
from utils.data import MEAN, normalize


def gen(seed):
    return torch.Generator().manual_seed(seed)


def textured(n, seed=0):
    """Random uint8 images: any shift or flip of one is told apart from the others."""
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen(seed))


def constant_colours(labels):
    """Float images of one colour each, distinct per class: a pixel names the image it came from."""
    colours = torch.stack([10 + 20 * labels, 15 + 20 * labels, 5 + 20 * labels], 1).float()
    return colours.view(-1, 3, 1, 1).expand(-1, -1, 32, 32).contiguous()


def find_translation(out, image, pad):
    """``(dy, dx, flipped)`` such that ``out``'s interior is ``image`` (or its mirror) moved that way, else None."""
    h, w = image.shape[-2:]
    for flipped, source in ((False, image), (True, image.flip(-1))):
        for dy in range(-pad, pad + 1):
            for dx in range(-pad, pad + 1):
                moved = source[:, pad + dy:h - pad + dy, pad + dx:w - pad + dx]
                if torch.equal(out[:, pad:h - pad, pad:w - pad], moved):
                    return dy, dx, flipped
    return None


def mixed_images_and_targets(images, generator):
    out, targets = mix(images.float(), torch.arange(len(images)) % 10, generator, kind="both")
    return torch.cat([out.flatten(1), targets], 1)


AUGMENTATIONS = {"translate_flip": random_translate_flip, "cutout": cutout, "mix": mixed_images_and_targets}


# ----------------------------------------------------------------------------- seeding

@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_same_generator_state_same_batch_other_seed_other_batch(name):
    augment, images = AUGMENTATIONS[name], textured(32)
    assert torch.equal(augment(images, gen(1)), augment(images, gen(1)))
    assert not torch.equal(augment(images, gen(1)), augment(images, gen(2)))


def test_mix_takes_an_int_seed_and_leaves_the_global_rng_alone():
    images, labels = constant_colours(torch.arange(8)), torch.arange(8)
    before = torch.get_rng_state()
    first = mix(images, labels, 7, kind="both")
    assert torch.equal(torch.get_rng_state(), before)
    again = mix(images, labels, 7, kind="both")
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], mix(images, labels, 8, kind="both")[0])


def test_mix_advances_its_generator_so_each_batch_differs():
    images, labels, g = constant_colours(torch.arange(8)), torch.arange(8), gen(0)
    assert not torch.equal(mix(images, labels, g, kind="mixup")[1], mix(images, labels, g, kind="mixup")[1])


# ----------------------------------------------------------------------------- translate and flip

def test_zeros_padding_is_the_classic_crop_with_black_borders():
    white = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    out = random_translate_flip(white, gen(0), pad=4, padding_mode="zeros")
    assert torch.equal(out, random_translate_flip(white, gen(0), pad=4, padding_mode="constant"))
    black_rows = (out == 0).all(3).all(1).sum(1)  # per image, the rows the shift filled with zeros
    assert (black_rows <= 4).all() and black_rows.float().mean() > 1


def test_reflect_padding_never_writes_black():
    white = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    assert torch.equal(random_translate_flip(white, gen(0), pad=4), white)


def test_each_output_is_a_translation_of_its_own_image_and_all_moves_occur():
    images = textured(400)
    out = random_translate_flip(images, gen(0), pad=1)
    moves = [find_translation(o, i, pad=1) for o, i in zip(out, images)]
    assert None not in moves  # image i came from image i: labels still match
    assert len(set(moves)) == 3 * 3 * 2


# ----------------------------------------------------------------------------- cutout

def test_cutout_paints_one_square_clipped_by_the_border():
    size, white = 12, torch.full((256, 3, 32, 32), 255, dtype=torch.uint8)
    out = cutout(white, gen(0), size=size, fill=0)
    assert set(out.unique().tolist()) == {0, 255}
    square = out[:, 0] == 0
    assert torch.equal(square, (out == 0).all(1))  # every channel painted, or none
    areas = []
    for mask in square:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert len(rows) == rows[-1] - rows[0] + 1 and len(cols) == cols[-1] - cols[0] + 1
        assert mask.sum() == len(rows) * len(cols)  # a filled rectangle
        for hit in (rows, cols):
            assert len(hit) == size or hit[0] == 0 or hit[-1] == 31
            assert size // 2 <= len(hit) <= size
        areas.append(int(mask.sum()))
    assert max(areas) == size * size and min(areas) < size * size


def test_cutout_leaves_the_rest_of_each_image_alone():
    images = textured(64).clamp(min=1)
    out = cutout(images, gen(0), size=12, fill=0)
    kept = out != 0
    assert torch.equal(out[kept], images[kept])  # image i is still image i: labels still match
    assert ((~kept).sum((1, 2, 3)) <= 3 * 12 * 12).all()


def test_cutout_default_fill_is_the_mean_so_the_square_normalises_to_zero():
    assert CIFAR10_MEAN_PIXEL == tuple(round(255 * m) for m in MEAN)
    black = torch.zeros(16, 3, 32, 32, dtype=torch.uint8)
    x = normalize(cutout(black, gen(0)))
    square = (x > -1).all(1, keepdim=True).expand_as(x)
    assert square.any() and x[square].abs().max() < 0.01


# ----------------------------------------------------------------------------- CutMix and MixUp

def mixed_batch(kind, seed, n=8, **kwargs):
    labels = torch.randperm(10, generator=gen(seed))[:n]
    images = constant_colours(labels)
    return images, labels, *mix(images, labels, seed, kind=kind, **kwargs)


def assert_soft_targets(targets, labels, own_weight):
    """Each row is ``own_weight`` on its own label and the rest on the previous image's label."""
    want = torch.zeros(len(labels), 10)
    want[torch.arange(len(labels)), labels.roll(1)] = 1 - own_weight
    want[torch.arange(len(labels)), labels] += own_weight
    torch.testing.assert_close(targets, want)
    torch.testing.assert_close(targets.sum(1), torch.ones(len(labels)))


def test_cutmix_weight_is_the_fraction_of_the_image_kept():
    partial = 0
    for seed in range(10):
        images, labels, out, targets = mixed_batch("cutmix", seed)
        own = (out == images).all(1).float().mean((1, 2))
        pasted = (out == images.roll(1, 0)).all(1).float().mean((1, 2))
        torch.testing.assert_close(own + pasted, torch.ones(len(labels)))  # nothing but the two images
        assert_soft_targets(targets, labels, own)
        partial += bool(0 < own[0] < 1)
    assert partial >= 5


def test_mixup_weight_is_the_blend_of_the_pixels():
    for seed in range(5):
        images, labels, out, targets = mixed_batch("mixup", seed)
        previous = images.roll(1, 0)
        weight = (out - previous) / (images - previous)  # the same at every pixel of an image
        torch.testing.assert_close(weight, weight[:, :1, :1, :1].expand_as(weight))
        assert_soft_targets(targets, labels, weight[:, 0, 0, 0])


def test_both_picks_cutmix_or_mixup_per_batch():
    kinds = set()
    for seed in range(20):
        images, _, out, _ = mixed_batch("both", seed)
        blended = not ((out == images) | (out == images.roll(1, 0))).all()
        kinds.add("mixup" if blended else "cutmix")
    assert kinds == {"cutmix", "mixup"}


def test_p_mixes_only_some_batches_and_leaves_the_others_one_hot():
    images, labels, out, targets = mixed_batch("mixup", 0, p=0.0)
    assert torch.equal(out, images) and torch.equal(targets, nn.functional.one_hot(labels, 10).float())
    mixed = [not torch.equal(mixed_batch("mixup", seed, p=0.5)[2], mixed_batch("mixup", seed)[0])
             for seed in range(20)]
    assert 0 < sum(mixed) < 20


def test_mix_of_soft_targets_mixes_them_too():
    labels = torch.arange(8)
    soft = torch.softmax(torch.randn(8, 10, generator=gen(0)), 1)
    images = constant_colours(labels)
    out, targets = mix(images, soft, 3, kind="mixup")
    weight = ((out - images.roll(1, 0)) / (images - images.roll(1, 0)))[:, 0, 0, 0].view(-1, 1)
    torch.testing.assert_close(targets, weight * soft + (1 - weight) * soft.roll(1, 0))


@pytest.mark.parametrize("kind", ["cutmix", "mixup"])
def test_mix_keeps_channels_last_and_leaves_its_input_alone(kind):
    images = constant_colours(torch.arange(8)).contiguous(memory_format=torch.channels_last)
    copy = images.clone()
    out, _ = mix(images, torch.arange(8), 0, kind=kind)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images, copy)


def test_mix_refuses_integer_images_and_unknown_kinds():
    with pytest.raises(TypeError, match="float"):
        mix(textured(4), torch.arange(4), 0, kind="mixup")
    with pytest.raises(ValueError, match="cutmix, mixup, both"):
        mix(textured(4).float(), torch.arange(4), 0, kind="cutout")


# ----------------------------------------------------------------------------- test-time augmentation

def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 32 * 32, 10)).eval()


def test_tta_without_translations_is_the_flip_tta():
    model, x = small_net(), normalize(textured(8))
    assert torch.equal(tta_logits(model, x, translations=0), (model(x) + model(x.flip(3))) / 2)


@pytest.mark.parametrize("translations", [1, 2])
def test_tta_of_a_model_blind_to_flips_and_shifts_is_its_logits(translations):
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    x = normalize(constant_colours(torch.arange(8)).to(torch.uint8))  # every flip or shift of it is itself
    torch.testing.assert_close(tta_logits(model, x, translations), model(x))


def test_tta_views_are_the_image_its_mirror_and_their_reflected_diagonal_shifts():
    seen = []

    def recording_model(view):
        seen.append(view)
        return view.mean((1, 2, 3))

    x = normalize(textured(2))
    tta_logits(recording_model, x, translations=1)

    def shifted(d):  # numpy's reflect padding as an independent reference
        padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
        return torch.from_numpy(padded[..., 1 - d:33 - d, 1 - d:33 - d])

    want = [v for d in (0, 1, -1) for v in (shifted(d), shifted(d).flip(3))]
    assert len(seen) == len(want) and all(torch.equal(s, w) for s, w in zip(seen, want))


# ----------------------------------------------------------------------------- in the loader and the engine

def loader_batches(augment, start=0, epoch=0, seed=0):
    from utils.data import DeviceLoader

    images, labels = textured(24), torch.arange(24) % 10
    loader = DeviceLoader(images, labels, batch_size=8, device="cpu", train=True, augment=augment, seed=seed)
    loader.set_epoch(epoch)
    return list(loader.batches(start))


EVERYTHING = Augmentation(translate=4, padding="reflect", cutout=8, mix="both", mix_alpha=1.0, mix_prob=1.0)


def test_a_batch_depends_only_on_seed_epoch_and_position_so_a_resumed_epoch_sees_the_same():
    whole = loader_batches(EVERYTHING)
    assert len(whole) == 3
    for (x, y), (x2, y2) in zip(whole[1:], loader_batches(EVERYTHING, start=1)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other_epoch, other_seed = loader_batches(EVERYTHING, epoch=1), loader_batches(EVERYTHING, seed=1)
    assert not torch.equal(whole[0][0], other_epoch[0][0]) and not torch.equal(whole[0][0], other_seed[0][0])


def test_mixed_batches_carry_soft_targets_of_their_own_labels():
    for x, y in loader_batches(EVERYTHING):
        assert y.shape == (8, 10) and torch.allclose(y.sum(1), torch.ones(8))
        assert ((y > 0).sum(1) <= 2).all()  # each image mixes at most two classes


def test_without_mixing_labels_stay_class_indices():
    for _, y in loader_batches(Augmentation(translate=4, padding="zeros", cutout=8)):
        assert y.dtype == torch.int64 and y.dim() == 1


def test_views_are_averaged_in_float32_whatever_the_precision_of_the_logits():
    """Under bf16 autocast each view's logits are bf16: their sum must not be rounded to bf16 on the way."""
    torch.manual_seed(0)
    weight, outputs = torch.randn(3 * 8 * 8, 10), []

    def model(x):
        outputs.append((x.flatten(1) @ weight).bfloat16())
        return outputs[-1]

    x = torch.randn(64, 3, 8, 8)
    averaged = predict(model, x, "flip-shift")
    assert averaged.dtype == torch.float32 and len(outputs) == 6
    torch.testing.assert_close(averaged, sum(o.float() for o in outputs) / 6, rtol=0, atol=0)
    assert not torch.equal(averaged, (sum(outputs) / 6).float())  # what a bf16 sum gives instead
    assert predict(model, x, "none").dtype == torch.float32


@pytest.mark.parametrize("tta,views", [("none", 1), ("flip", 2), ("flip-shift", 6)])
def test_predict_averages_the_views_of_its_tta_mode(tta, views):
    calls = []

    def model(x):
        calls.append(x)
        return x.mean((1, 2, 3))[:, None].expand(-1, 10)

    x = torch.randn(3, 3, 8, 8)
    assert predict(model, x, tta).shape == (3, 10)
    assert len(calls) == views == TTA_VIEWS[tta]
