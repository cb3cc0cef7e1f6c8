"""The model registry (shapes, gradients, CIFAR stem, stats) and the knowledge-distillation losses."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_model, model_stats
from utils.choices import MODEL_NAMES
from utils.choices import KD_LOSSES
from utils.losses import SOFT_TERMS, distillation_loss, kd_terms


def kd_loss(name, student, teacher, targets, temperature=4.0, alpha=0.9, label_smoothing=0.0):
    """The loss a student trains with, as ``utils.engine.fit`` calls it."""
    return distillation_loss(name, temperature, alpha, label_smoothing)(student, targets, teacher)["loss"]


CLASSIFIERS = [name for name in MODEL_NAMES if name != "selector"]


# Sizes of the CIFAR variants (3x3 stride-1 stem, no first max-pooling), 10 classes, by torch.utils.flop_counter.
# An ImageNet stem on 32x32 inputs would cost about 16x fewer FLOPs and end on 1x1 maps.
EXPECTED = {
    "resnet50": {"params": 23.52e6, "gflops": 2.596, "feature_map": "4x4"},
    "densenet121": {"params": 6.96e6, "gflops": 1.777, "feature_map": "4x4"},
    "googlenet": {"params": 5.60e6, "gflops": 0.904, "feature_map": "4x4"},  # keeps maxpool2
    "googlenet32": {"params": 5.60e6, "gflops": 2.902, "feature_map": "8x8"},  # the earlier default
    "resnet18": {"params": 11.17e6, "gflops": 1.111, "feature_map": "4x4"},
}


def test_registry_names():
    assert set(MODEL_NAMES) == {"resnet50", "densenet121", "googlenet", "googlenet32", "resnet18", "selector"}


def test_students_cost_less_than_the_teacher_as_in_the_original():
    """The original's ImageNet networks at 224x224: DenseNet121 0.69x and GoogLeNet 0.37x ResNet50's FLOPs."""
    gflops = {name: model_stats(build_model(name))["flops"] / 1e9 for name in ("resnet50", "densenet121", "googlenet")}
    assert gflops["densenet121"] / gflops["resnet50"] == pytest.approx(0.68, abs=0.01)
    assert gflops["googlenet"] / gflops["resnet50"] == pytest.approx(0.35, abs=0.01)
    assert model_stats(build_model("googlenet32"))["flops"] > model_stats(build_model("resnet50"))["flops"]


def test_models_table_lists_every_network_with_its_cost_against_the_teacher(capsys):
    from models.__main__ import main

    main([])
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == set(MODEL_NAMES)
    assert "| 0.904 | 0.35 | 4x4 | 2.99 | 0.37 |" in rows["googlenet"]
    assert "| 1.777 | 0.68 | 4x4 | 5.67 | 0.69 |" in rows["densenet121"]
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m models [-h]")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_and_backward(name):
    torch.manual_seed(0)
    num_classes = 3 if name == "selector" else 10
    model = build_model(name, num_classes).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    assert all(torch.isfinite(p.grad).all() for p in params)
    assert sum(p.grad.abs().sum().item() for p in params) > 0

    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, num_classes)


def test_num_classes_is_honoured():
    assert build_model("googlenet", 7)(torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)).shape == (2, 7)


def test_selector_needs_two_students():
    with pytest.raises(ValueError):
        build_model("selector", 1)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError) as e:
        build_model("vgg16")
    message = str(e.value)
    assert "vgg16" in message
    for name in MODEL_NAMES:
        assert name in message


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_cifar_stem_and_stats(name):
    model = build_model(name, 10)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 3
    assert first_conv.kernel_size == (3, 3) and first_conv.stride == (1, 1) and first_conv.padding == (1, 1)

    shapes = []
    hook = first_conv.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    was_training = model.training
    stats = model_stats(model)
    hook.remove()
    assert shapes and shapes[0][-2:] == (32, 32)  # full resolution after the stem
    assert model.training == was_training  # model_stats restores the mode

    expected = EXPECTED[name]
    assert stats["params"] == sum(p.numel() for p in model.parameters())
    assert stats["params"] == pytest.approx(expected["params"], rel=0.01)
    assert stats["flops"] / 1e9 == pytest.approx(expected["gflops"], abs=0.001)
    assert stats["feature_map"] == expected["feature_map"]


def test_selector_stats():
    stats = model_stats(build_model("selector", 3))
    assert stats["params"] > 0 and stats["flops"] > 0 and stats["feature_map"] == "4x4"


# ----------------------------------------------------------------------------- KD losses

def softmax(z):
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def reference_kl(student, teacher, temperature):
    """KL(softmax(t/T) || softmax(s/T)) averaged over the batch, written out by hand in float64."""
    p_s = softmax(student.double() / temperature)
    p_t = softmax(teacher.double() / temperature)
    return (p_t * (torch.log(p_t) - torch.log(p_s))).sum(dim=1).mean()


def reference_ce(student, targets, smoothing=0.0):
    log_p = torch.log(softmax(student.double()))
    nll = -log_p[torch.arange(len(targets)), targets]
    uniform = -log_p.mean(dim=1)
    return ((1 - smoothing) * nll + smoothing * uniform).mean()


def logits(seed, batch=6, classes=10, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=g) * scale


TARGETS = torch.tensor([0, 3, 9, 3, 5, 1])


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.9), (2.0, 1.0), (8.0, 0.3)])
def test_kl_loss_matches_a_hand_computation(temperature, alpha):
    s, t = logits(0), logits(1)
    got = kd_loss("kl", s, t, TARGETS, temperature=temperature, alpha=alpha)
    want = alpha * temperature ** 2 * reference_kl(s, t, temperature) + (1 - alpha) * reference_ce(s, TARGETS)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    terms = kd_terms("kl", s, t, TARGETS, temperature=temperature, alpha=alpha)
    assert torch.equal(got, terms["loss"])
    torch.testing.assert_close(terms["kd"].double(), temperature ** 2 * reference_kl(s, t, temperature), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(terms["ce"].double(), reference_ce(s, TARGETS), rtol=1e-5, atol=1e-6)


def test_kl_gradient_at_temperature_one():
    s, t = logits(2).requires_grad_(), logits(3)
    alpha = 1.0
    kd_loss("kl", s, t, TARGETS, temperature=1.0, alpha=alpha).backward()
    want = alpha * (softmax(s.detach()) - softmax(t)) / len(s)
    torch.testing.assert_close(s.grad, want, rtol=1e-4, atol=1e-6)


def test_kl_gradient_scales_with_alpha_and_temperature():
    # the T^2 factor: at temperature T the soft-term gradient is alpha * T * (p_s^T - p_t^T) / B
    s, t = logits(4).requires_grad_(), logits(5)
    alpha, temperature = 0.7, 3.0
    kd_loss("kl", s, t, TARGETS, temperature=temperature, alpha=alpha).backward()
    soft = alpha * temperature * (softmax(s.detach() / temperature) - softmax(t / temperature)) / len(s)
    hard = (1 - alpha) * (softmax(s.detach()) - F.one_hot(TARGETS, 10)) / len(s)
    torch.testing.assert_close(s.grad, soft + hard, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_alpha_zero_is_plain_cross_entropy(name):
    s, t = logits(6), logits(7)
    got = kd_loss(name, s, t, TARGETS, temperature=4.0, alpha=0.0)
    torch.testing.assert_close(got, F.cross_entropy(s, TARGETS))
    torch.testing.assert_close(got.double(), reference_ce(s, TARGETS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_identical_logits_have_no_kl(temperature):
    s = logits(8)
    got = kd_loss("kl", s, s.clone(), TARGETS, temperature=temperature, alpha=1.0)
    assert abs(got.item()) < 1e-6
    assert kd_loss("kl", s, logits(9), TARGETS, temperature=temperature, alpha=1.0).item() > 1e-3


def test_mse_loss_is_the_mean_squared_logit_difference():
    s, t = logits(10), logits(11)
    got = kd_loss("mse", s, t, TARGETS, temperature=4.0, alpha=1.0)
    torch.testing.assert_close(got, ((s - t) ** 2).mean())
    # the temperature does not enter the mse loss
    torch.testing.assert_close(kd_loss("mse", s, t, TARGETS, temperature=1.0, alpha=1.0), got)
    mixed = kd_loss("mse", s, t, TARGETS, alpha=0.25)
    torch.testing.assert_close(mixed.double(), 0.25 * ((s - t) ** 2).double().mean() + 0.75 * reference_ce(s, TARGETS),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_label_smoothing_changes_only_the_cross_entropy(name):
    s, t = logits(12), logits(13)
    smoothing, alpha = 0.1, 0.6
    plain = kd_loss(name, s, t, TARGETS, temperature=4.0, alpha=alpha)
    smoothed = kd_loss(name, s, t, TARGETS, temperature=4.0, alpha=alpha, label_smoothing=smoothing)
    want = (1 - alpha) * (reference_ce(s, TARGETS, smoothing) - reference_ce(s, TARGETS))
    assert not math.isclose(plain.item(), smoothed.item())
    torch.testing.assert_close((smoothed - plain).double(), want, rtol=1e-4, atol=1e-6)
    # with alpha = 1 only the teacher term is left, and smoothing has no effect
    torch.testing.assert_close(kd_loss(name, s, t, TARGETS, alpha=1.0, label_smoothing=smoothing),
                               kd_loss(name, s, t, TARGETS, alpha=1.0))


def test_low_precision_logits_are_computed_in_float32():
    s, t = logits(14), logits(15)
    got = kd_loss("kl", s.bfloat16(), t.bfloat16(), TARGETS, temperature=4.0, alpha=0.9)
    assert got.dtype == torch.float32
    want = kd_loss("kl", s.bfloat16().float(), t.bfloat16().float(), TARGETS, temperature=4.0, alpha=0.9)
    torch.testing.assert_close(got, want)


def test_unknown_kd_loss_is_refused():
    s, t = logits(16), logits(17)
    with pytest.raises(ValueError) as e:
        kd_loss("cosine", s, t, TARGETS)
    assert "cosine" in str(e.value)
    for name in KD_LOSSES:
        assert name in str(e.value)


def test_every_name_a_flag_offers_is_implemented_and_nothing_else():
    """``utils.choices`` lists them without importing torch; the modules that implement them agree."""
    import models.cifar
    from utils import augment, choices, policies

    assert tuple(models.cifar._BUILDERS) == choices.CLASSIFIERS
    assert tuple(SOFT_TERMS) == choices.KD_LOSSES
    assert tuple(augment.MIXERS) == choices.MIXERS and tuple(augment.TTA_VIEWS) == choices.TTA
    assert set(choices.ROUTERS) <= set(policies.POLICIES)
    assert all(issubclass(policies.POLICIES[name], policies.ThresholdRouter) for name in choices.ROUTERS)
