"""Model registry: ``build_model(name)`` is the single way to construct a network."""

from models.cifar import CLASSIFIERS, MODEL_NAMES, build_model
from models.pretrained import model_args
from models.stats import model_stats

__all__ = ["build_model", "CLASSIFIERS", "MODEL_NAMES", "model_args", "model_stats"]
