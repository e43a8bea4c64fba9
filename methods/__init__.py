"""OOD scoring methods: one small fit/score interface and a name registry.

Importing this package registers every method in ``METHODS``.
"""
from methods import logit_scores  # noqa: F401  (registers msp, maxlogit, energy)
from methods import gradient_scores  # noqa: F401
from methods import distance_scores  # noqa: F401
from methods import shaping_scores  # noqa: F401
from methods import network_scores  # noqa: F401  (ash_layer, odin: their network half imports torch lazily)
from methods.base import METHODS, Method, make_method, parameter_grid

__all__ = ["METHODS", "Method", "make_method", "parameter_grid"]
