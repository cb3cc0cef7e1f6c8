"""The names a flag may take: architectures, losses, augmentations, schedules, routing policies.

Kept free of torch, so that building a parser (``--help``, a bad flag) imports nothing heavy. The
modules that implement each name (``models``, ``utils.losses``, ``utils.augment``,
``utils.policies``) are checked by the tests to implement exactly these.
"""

CLASSIFIERS = ("resnet50", "densenet121", "googlenet", "googlenet32", "resnet18")  # models.build_model's networks
MODEL_NAMES = (*CLASSIFIERS, "selector")
KD_LOSSES = ("kl", "mse")  # utils.losses
MIXERS = ("cutmix", "mixup", "both")  # utils.augment.mix
TTA = ("none", "flip", "flip-shift")  # utils.augment.TTA_VIEWS
PADDINGS = ("reflect", "zeros")
SCHEDULES = ("cosine", "linear")
ROUTERS = ("cascade", "deferral", "selector")  # utils.policies: the threshold policies a routed system may use
SPECIALISATIONS = ("mcl", "groups")  # utils.distill: how students are trained to differ on purpose
SELECTOR_TARGETS = ("right", "gain", "assignment")  # utils.selector: what the selector learns per student
