"""Knowledge-distillation losses on raw logits, chosen by name."""

import torch.nn.functional as F


def kl_kd_loss(student_logits, teacher_logits, targets, temperature=4.0, alpha=0.9, label_smoothing=0.0):
    """Hinton et al.: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    The ``T^2`` factor keeps the soft term's gradient scale independent of ``T``.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


def mse_kd_loss(student_logits, teacher_logits, targets, temperature=None, alpha=0.9, label_smoothing=0.0):
    """Caruana-style logit matching: ``alpha * mean((s - t)^2) + (1 - alpha) * CE(s, y)``; no temperature."""
    mse = F.mse_loss(student_logits.float(), teacher_logits.float())
    ce = F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)
    return alpha * mse + (1 - alpha) * ce


KD_LOSSES = {"kl": kl_kd_loss, "mse": mse_kd_loss}


def kd_loss(name, student_logits, teacher_logits, targets, temperature=4.0, alpha=0.9, label_smoothing=0.0):
    if name not in KD_LOSSES:
        raise ValueError(f"unknown KD loss {name!r}; valid names: {', '.join(KD_LOSSES)}")
    return KD_LOSSES[name](student_logits, teacher_logits, targets, temperature=temperature, alpha=alpha,
                           label_smoothing=label_smoothing)
