"""A new OOD score written outside oodbench: cosine similarity to the ID class means.

    S(x) = mean of the ``top`` largest cos(v(x), mu_c) over classes c,

with v(x) the penultimate feature and mu_c the mean feature of class c on the ID fit split.
Run it like a built-in (from this folder, or with it on PYTHONPATH):

    oodbench score digits --method cosine_scores:CosineToClassMeans --param top=2
    oodbench sweep digits --method cosine_scores:CosineToClassMeans --grid top=1,2,3
"""
import numpy as np

from methods import Method


class CosineToClassMeans(Method):
    name = "cosine_means"
    reads = ("features", "labels", "logits")  # labels: of the fit split only; logits: predictions
    grid = {"top": [1, 2, 3]}

    def __init__(self, top: int = 1):
        self.top = top

    def fit(self, split):
        features, labels = np.asarray(split.features, np.float64), np.asarray(split.labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in np.unique(labels)])
        self.means_ = means / np.linalg.norm(means, axis=1, keepdims=True)
        return self

    def score_samples(self, split):
        features = np.asarray(split.features, np.float64)
        cosines = features @ self.means_.T / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        return -np.sort(-cosines, axis=1)[:, :self.top].mean(axis=1)
