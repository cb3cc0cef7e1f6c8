"""Model registry: ``build_model(name)`` is the single way to construct a network (its names:
``utils.choices.CLASSIFIERS`` and the ``selector``)."""

from models.cifar import build_model
from models.pretrained import model_args
from models.stats import model_stats

__all__ = ["build_model", "model_args", "model_stats"]
