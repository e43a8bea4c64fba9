"""OOD scoring methods: one small fit/score interface and a name registry.

Importing this package registers every method in ``METHODS``.
"""
from methods import (
    confidence_scores,  # noqa: F401
    distance_scores,  # noqa: F401
    geometry_scores,  # noqa: F401
    gradient_scores,  # noqa: F401
    logit_scores,  # noqa: F401  (registers msp, maxlogit, energy)
    network_scores,  # noqa: F401  (their network halves import torch only when they run)
    shaping_scores,  # noqa: F401
)
from methods.base import METHODS, Method, make_method, parameter_grid

# methods that score from the cached entries alone (the others need their network pass first)
CACHE_ONLY_METHODS = tuple(sorted(name for name, cls in METHODS.items() if "network" not in cls.reads))

__all__ = ["CACHE_ONLY_METHODS", "METHODS", "Method", "make_method", "parameter_grid"]
