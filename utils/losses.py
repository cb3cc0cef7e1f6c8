"""Knowledge-distillation losses on raw logits, chosen by name.

``loss = alpha * soft + (1 - alpha) * CE(s, y)``, where the soft term compares the student's
logits ``s`` with the teacher's ``t``:

* ``kl`` (Hinton et al.): ``T^2 * KL(softmax(t/T) || softmax(s/T))``; the ``T^2`` factor keeps
  the soft term's gradient scale independent of ``T``;
* ``mse`` (Caruana-style logit matching): ``mean((s - t)^2)``; no temperature.
"""

import torch.nn.functional as F


def kl_term(student_logits, teacher_logits, temperature, per_image=False):
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    if per_image:
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(1)
        return temperature ** 2 * kl
    return temperature ** 2 * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def mse_term(student_logits, teacher_logits, temperature=None, per_image=False):
    if per_image:
        return (student_logits - teacher_logits).square().mean(1)
    return F.mse_loss(student_logits, teacher_logits)


SOFT_TERMS = {"kl": kl_term, "mse": mse_term}  # by their names in utils.choices.KD_LOSSES


def kd_terms(name, student_logits, teacher_logits, targets, temperature=4.0, alpha=0.9, label_smoothing=0.0,
             per_image=False):
    """``{"loss", "kd", "ce"}``: the loss and its two unweighted terms, all in float32; their means over the
    batch, or with ``per_image`` one value per image."""
    if name not in SOFT_TERMS:
        raise ValueError(f"unknown KD loss {name!r}; valid names: {', '.join(SOFT_TERMS)}")
    soft = SOFT_TERMS[name](student_logits.float(), teacher_logits.float(), temperature, per_image)
    ce = F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing,
                         reduction="none" if per_image else "mean")
    return {"loss": alpha * soft + (1 - alpha) * ce, "kd": soft, "ce": ce}


def classification_loss(label_smoothing=0.0):
    """Cross-entropy with the labels, as ``utils.engine.fit`` calls a loss:
    ``loss_fn(logits, targets, teacher_logits)``."""
    def loss_fn(logits, targets, teacher_logits=None):
        return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    return loss_fn


def distillation_loss(name, temperature=4.0, alpha=0.9, label_smoothing=0.0):
    """The KD loss ``name`` as ``utils.engine.fit`` calls a loss; it returns the terms of ``kd_terms``."""
    if name not in SOFT_TERMS:
        raise ValueError(f"unknown KD loss {name!r}; valid names: {', '.join(SOFT_TERMS)}")

    def loss_fn(logits, targets, teacher_logits):
        return kd_terms(name, logits, teacher_logits, targets, temperature, alpha, label_smoothing)
    return loss_fn
