"""Model registry: ``build_model(name)`` is the single way to construct a network."""

from models.cifar import build_model, MODEL_NAMES
from models.stats import model_stats

__all__ = ["build_model", "MODEL_NAMES", "model_stats"]
