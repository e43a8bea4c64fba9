"""oodbench's Python API: ``import oodbench as ob`` (docs/python-api.md).

    metrics = ob.run("fashion-mnist")                             # tidy metrics, as metrics.csv
    metrics = ob.evaluate_model(model, "fashion-mnist", head="fc")  # an nn.Module, no YAML
    splits = ob.open_splits("fashion-mnist")                      # cached arrays for a notebook
    ob.score(MyScore(alpha=2), splits)                            # fit, score, metrics in memory

A method of your own subclasses ``ob.Method`` (its contract is in that class's docstring) and is
named anywhere a built-in is by 'module:Class'.
"""
from harness.api import Bench, Splits, evaluate_model, open_splits, run, score
from methods import METHODS
from methods.base import Method, SplitView, make_method, register
from methods.network_scores import NetworkMethod
from results.metrics import ood_metrics

__all__ = ["METHODS", "Bench", "Method", "NetworkMethod", "SplitView", "Splits", "evaluate_model", "make_method",
           "ood_metrics", "open_splits", "register", "run", "score"]
