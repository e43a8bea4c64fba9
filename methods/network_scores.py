"""Methods that go back through the network: ASH and ReAct at any named layer, ODIN, GradNorm by
autograd, the Mahalanobis ensemble (METHODS.md 1.8, 1.6, 1.4, 1.9, 1.5a).

A network method has two halves. ``network_outputs(network, rows)`` runs the network (an
``extract.network.Network``) over rows of a cache entry and returns arrays; the harness caches
them as a derived entry beside the entry (``extract.network.derive``), keyed by the entry and
``network_key()``. ``score_samples``/``predict`` then read that derived entry like any other, so
re-scoring, sweeps over parameters the pass does not depend on, and leaderboards never run the
network again. This module itself never imports torch: scoring a derived entry does not need it.
What each method computes through the network (its torch half) is in ``methods.network_passes``,
imported when a pass runs.
"""
from __future__ import annotations

import warnings

import numpy as np

from methods.base import (
    Method,
    NonFiniteOutputs,
    check_fitted,
    finite_logits,
    register,
    rowwise_apply,
    softmax_rows,
    split_name,
)
from methods.distance_scores import class_means_and_tied_covariance, pinv_precision
from methods.logit_scores import energy
from methods.shaping_scores import (
    ASH_GRID,
    ASH_VARIANTS,
    REACT_GRID,
    ash_rand,
    check_percentile,
    react_clip,
    react_threshold,
)

ODIN_SPACES = ("pixel", "normalized")
# the input-noise magnitudes the Mahalanobis ensemble selects from (Lee et al. 2018's code)
MAHALANOBIS_EPSILONS = (0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005)
# what the Mahalanobis ensemble's regression is tuned against: FGSM copies of held-out ID images (the
# UM/ReAct/GradNorm code) or a validation OOD set (Lee et al. 2018 tuned on real OOD data)
MAHALANOBIS_TUNING = ("fgsm", "validation")
# a layer parameter meaning the backbone's declared shaping layer (``Backbone.shaping_layer``)
LAST_BLOCK = "last_block"
BACKBONE_LAYERS = "backbone"  # a layers parameter meaning the backbone's declared feature layers


class NetworkMethod(Method):
    """Base class of methods whose outputs need the network (``reads`` = network)."""

    reads = ("network",)
    outputs: tuple[str, ...] = ("logits", "features")  # the arrays ``network_outputs`` returns
    version = 1
    fits_through_network = False  # True: ``network_fit`` learns state on the fit set's images

    def network_key(self, declared: dict | None = None) -> dict:
        """What the network pass depends on: the cache key of its outputs (every parameter by default).

        ``declared``: the layers the backbone declares (``Backbone.declared()``); a symbolic layer
        parameter ('last_block', 'backbone') is keyed by the modules it stands for, so a backbone
        that declares other layers never reuses outputs computed at the old ones."""
        key = {**self.get_params(), "version": self.version}
        code = self.code_key()
        if code:  # a plugin: its outputs are keyed by its source too
            key["code"] = code
        declared = declared or {}
        if key.get("layer") == LAST_BLOCK and declared.get("shaping_layer"):
            key["layer"] = declared["shaping_layer"]
        if key.get("layers") == BACKBONE_LAYERS and declared.get("layers"):
            key["layers"] = list(declared["layers"])
        return key

    def fit_key(self, declared: dict | None = None, validation_entry=None) -> dict:
        """The key of the state ``network_fit`` learns (its ``<method>-fit`` entry): ``network_key``,
        plus the validation OOD entry's data key for a method that ``needs_validation_set``."""
        key = self.network_key(declared)
        if self.needs_validation_set:
            if validation_entry is None:
                raise ValueError(f"{self.name} is tuned on the validation OOD set: its fit needs that set's entry")
            key["validation"] = validation_entry.data_key
        return key

    def output_key(self, fit_entry=None, declared: dict | None = None, validation_entry=None) -> dict:
        """The key of this method's outputs on any entry: ``network_key``, plus the fit entry for a
        method whose state is learned on it (other fit data, other outputs), and the validation OOD
        entry for one tuned on that too (``fit_key``)."""
        if not self.fits_through_network:
            return self.network_key(declared)
        if fit_entry is None:
            raise ValueError(f"{self.name} is fitted through the network: its outputs need the fit entry")
        return {**self.fit_key(declared, validation_entry), "fit": fit_entry.data_key}

    @property
    def needs_validation_set(self) -> bool:
        """True when ``network_fit`` also needs the benchmark's validation OOD set (``validation=``);
        the harness must then pass that set's rows and key the fitted state by its entry too."""
        return False

    def network_fit(self, network, rows, passes, validation=None) -> dict[str, np.ndarray]:
        """The state learned on the fit entry's ``rows`` (all of them), as named arrays. Row-wise
        network passes go through ``passes(step, n, names, compute(start, stop) -> arrays)``, which
        runs them in resumable chunks with a progress bar and returns the concatenated arrays.
        ``validation``: the rows (``extract.network.EntryRows``) of the benchmark's validation OOD
        set, for a method whose ``needs_validation_set``; other methods ignore it."""
        raise NotImplementedError

    def load_state(self, state) -> "NetworkMethod":
        """Take the state ``network_fit`` computed, from its cached entry."""
        raise NotImplementedError

    def is_fitted(self) -> bool:
        return getattr(self, "state_", None) is not None

    def network_meta(self) -> dict:
        """Extra facts recorded in the derived entry's metadata (e.g. ODIN's epsilon convention)."""
        return {}

    def network_outputs(self, network, rows) -> dict[str, np.ndarray]:
        """``self.outputs`` for ``rows`` (``extract.network.EntryRows``), computed with ``network``."""
        raise NotImplementedError

    def check_network_outputs(self, arrays: dict[str, np.ndarray], dataset: str, backbone: str) -> None:
        """One ``NonFiniteOutputs`` when the pass over ``dataset`` (all rows) through ``backbone``
        gave NaN or infinite logits or features; ``extract.network.derive`` then writes nothing."""
        bad = ~(np.isfinite(arrays["logits"]).all(axis=1) & np.isfinite(arrays["features"]).all(axis=1))
        if bad.any():
            raise NonFiniteOutputs(
                f"{self.label()} produced NaN or infinite outputs on {bad.sum()} of {len(bad)} {dataset} samples "
                f"(first row {np.flatnonzero(bad)[0]}) through {backbone}; its operation overflows on this "
                f"backbone's activations (ASH and ReAct assume non-negative, ReLU-like ones) - choose another "
                f"layer or parameters")

    def derived(self, split):
        """``split`` when it holds this method's network outputs (a derived entry), else one clear error:
        scoring the plain entry would silently give another method's numbers."""
        meta = getattr(split, "meta", None) or {}
        if meta.get("kind") != "derived" or meta.get("method") != self.name:
            raise ValueError(f"{self.name} scores the outputs of its own network pass (a derived cache entry made "
                             f"by extract.network.derive), not {split_name(split)}; score it through a benchmark "
                             "(`oodbench run` / `oodbench score`), which computes them")
        return split

    def predict(self, split) -> np.ndarray:
        return finite_logits(self.derived(split)).argmax(axis=1)


def resolve_layer(network, layer: str) -> str:
    """A method's layer parameter as a layer of ``network``'s backbone: a module name,
    ``penultimate`` (the head's input), or ``LAST_BLOCK`` (the backbone's declared shaping layer);
    anything else is an error listing the names."""
    from extract.network import PENULTIMATE  # torch: only when the network runs

    backbone = network.backbone
    if layer == LAST_BLOCK:
        if not backbone.shaping_layer:
            raise ValueError(f"backbone {backbone.name!r} declares no shaping layer for "
                             f"layer={LAST_BLOCK!r}; give a module name (or 'shaping_layer' in its config)")
        layer = backbone.shaping_layer
    modules = [name for name, _ in network.model.named_modules() if name]
    if layer != PENULTIMATE and layer not in modules:
        raise ValueError(f"backbone {backbone.name!r} has no layer {layer!r}; use {PENULTIMATE!r}, "
                         f"{LAST_BLOCK!r} or one of its modules: {', '.join(modules)}")
    return layer


def tempered_msp(logits: np.ndarray, T: float) -> np.ndarray:
    """ODIN's score (Liang et al. 2018): S = max_c softmax(f / T)_c, in float64 (at T = 1000 the
    scores cluster around 1/C, so float32 would tie them)."""
    return softmax_rows(np.asarray(logits, np.float64) / T).max(axis=1)


class _LayerShaping(NetworkMethod):
    """Shared by the shaping methods at a named layer: ``shaping()`` is a numpy function of (N, n)
    rows (each sample's activation flattened over channels and space); the rest of the network runs
    on the shaped tensor - only its tail, from cached activations, when the entry has them - and
    S = LSE_1(f) of the resulting logits, whose argmax is the ID prediction.

    ``layer``: a module name of the backbone; ``penultimate`` (the head's input: what the
    cache-only methods shape, computed through the network); or ``last_block`` (default), the
    backbone's declared shaping layer (ASH's main placement: the last block's output before its
    final ReLU, where values can be negative).
    """

    layer = LAST_BLOCK

    def shaping(self):
        raise NotImplementedError

    def network_outputs(self, network, rows) -> dict[str, np.ndarray]:
        from methods.network_passes import numpy_rows  # torch: only when the network runs

        layer = resolve_layer(network, self.layer)
        shape = numpy_rows(self.shaping())
        cached = rows.activations(layer)
        if cached is not None and network.tail(layer) is not None:
            return network.tail_outputs(cached, layer, shape)
        return network.shaped_outputs(rows.images, layer, shape)

    def score_samples(self, split) -> np.ndarray:
        return rowwise_apply(lambda logits: energy(logits, 1.0), finite_logits(self.derived(split), dtype=None))


@register
class ASHLayer(_LayerShaping):
    """ASH at a named layer, through the network (Djurisic et al. 2023, "Extremely simple activation
    shaping"): per sample, top-k jointly over channels and space, k = n - round(n p / 100), variant
    p / b / s / rand exactly as the penultimate methods (``methods.shaping_scores``)."""

    name = "ash_layer"
    grid = {"p": ASH_GRID}

    def __init__(self, variant: str = "s", p: float = 90.0, layer: str = LAST_BLOCK, seed: int = 0):
        self.variant = variant
        self.p = p
        self.layer = layer
        self.seed = seed

    def shaping(self):
        """The numpy function of (N, n) rows this instance applies."""
        check_percentile(self.name, "p", self.p)
        if self.variant == "rand":
            return lambda rows: ash_rand(rows, self.p, self.seed)
        if self.variant not in ASH_VARIANTS:
            raise ValueError(f"{self.name}: unknown variant {self.variant!r}; expected one of p, b, s, rand")
        return lambda rows: ASH_VARIANTS[self.variant](rows, self.p)

    def network_key(self, declared: dict | None = None) -> dict:
        key = super().network_key(declared)
        if self.variant != "rand":
            del key["seed"]  # only ASH-RAND draws
        return key


@register
class ReActLayer(_LayerShaping):
    """ReAct at a named layer, through the network (Sun et al. 2021): a <- min(a, c), c the p-th
    percentile (numpy linear interpolation) of the fit split's activations at that layer, all
    samples x all units (x all positions); ``fit_samples`` seeded fit rows at most (0: all; the
    official code used about 2,000 validation images). At ``penultimate`` with every fit row this
    is the cache-only ``react``."""

    name = "react_layer"
    grid = {"p": REACT_GRID}
    fits_through_network = True

    def __init__(self, p: float = 90.0, layer: str = LAST_BLOCK, fit_samples: int = 10000, seed: int = 0):
        self.p = p
        self.layer = layer
        self.fit_samples = fit_samples
        self.seed = seed

    def network_fit(self, network, rows, passes, validation=None) -> dict[str, np.ndarray]:
        check_percentile(self.name, "p", self.p)
        layer = resolve_layer(network, self.layer)
        n = len(rows.images)
        chosen = np.arange(n) if not 0 < self.fit_samples < n else \
            np.sort(np.random.default_rng(self.seed).permutation(n)[:self.fit_samples])
        if layer == "penultimate":
            activations = rows.cached("features")[chosen]
        else:
            cached = rows.activations(layer)
            activations = cached[chosen] if cached is not None else passes(
                "activations", len(chosen), (layer,),
                lambda start, stop: {layer: network.layer_outputs(rows.images[chosen[start:stop]], layer)})[layer]
        return {"c": np.array([react_threshold(activations, self.p)]), "fit_rows": chosen}

    def load_state(self, state) -> "ReActLayer":
        self.state_ = state
        self.c_ = float(state.array("c")[0])
        return self

    def shaping(self):
        check_fitted(self, "c_")
        return lambda rows: react_clip(rows, self.c_)


@register
class ODIN(NetworkMethod):
    """ODIN (Liang et al. 2018): temperature scaling plus input pre-processing.

    y_hat = argmax f(x) (unscaled logits); x_tilde = x - epsilon * sign(grad_x CE(f(x)/T, y_hat))
    with epsilon in [0,1] pixel units (``space='pixel'``: the sign map divided by each channel's
    normalisation std, as the original code) or in normalised units (``space='normalized'``: the
    ReAct/DICE/GradNorm code); no clamping. S = max_c softmax(f(x_tilde)/T)_c. ID accuracy is
    from y_hat, the unperturbed forward pass. epsilon = 0 needs no network: the entry's logits are
    the unperturbed ones. The convention is recorded in the derived entry's metadata.
    """

    name = "odin"
    grid = {"T": [1.0, 10.0, 100.0, 1000.0], "epsilon": [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005]}
    outputs = ("logits", "features", "predictions")

    def __init__(self, T: float = 1000.0, epsilon: float = 0.0014, space: str = "pixel"):
        self.T = T
        self.epsilon = epsilon
        self.space = space

    def _check(self) -> None:
        if not (np.isfinite(self.T) and self.T > 0):
            raise ValueError(f"{self.name}: T must be > 0, got {self.T}")
        if not (np.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"{self.name}: epsilon must be >= 0, got {self.epsilon}")
        if self.space not in ODIN_SPACES:
            raise ValueError(f"{self.name}: space must be one of {ODIN_SPACES}, got {self.space!r}")

    def network_key(self, declared: dict | None = None) -> dict:
        self._check()
        if self.epsilon == 0:  # the unperturbed pass: neither T nor the space changes the logits
            return {"epsilon": 0.0, "version": self.version}
        return super().network_key(declared)

    def network_meta(self) -> dict:
        units = "[0,1] pixel units (sign map / channel std)" if self.space == "pixel" else "normalised-input units"
        return {"odin": {"T": self.T, "epsilon": self.epsilon, "epsilon_units": units}}

    def network_outputs(self, network, rows) -> dict[str, np.ndarray]:
        self._check()
        if self.epsilon == 0:
            logits = rows.cached("logits").astype(np.float64)
            return {"logits": logits, "features": rows.cached("features"),
                    "predictions": logits.argmax(axis=1).astype(np.int64)}
        from methods.network_passes import odin_outputs  # torch: only when the network runs

        return odin_outputs(network, rows.images, self.T, self.epsilon, self.space)

    def score_samples(self, split) -> np.ndarray:
        self._check()
        return rowwise_apply(lambda logits: tempered_msp(logits, self.T),
                             finite_logits(self.derived(split), dtype=None))

    def predict(self, split) -> np.ndarray:
        predictions = np.asarray(self.derived(split).array("predictions"))
        if predictions.shape != (len(split.logits),):
            raise ValueError(f"{split_name(split)}: ODIN needs one prediction per sample from its derived entry")
        return predictions


@register
class GradNormAutograd(NetworkMethod):
    """GradNorm (Huang et al. 2021) by per-sample autograd: S = sum_{i} |dL/dP_i| for the official
    loss L = sum_c -log softmax(f/T)_c, P = ``parameter`` ('head': the head's weight W, the
    official choice). For a linear head this equals the closed form (C/T) U V of ``gradnorm``;
    other parameters (an MLP head's last layers, any weight) need the backward pass."""

    name = "gradnorm_autograd"
    grid = {"T": [0.5, 1.0, 2.0]}
    outputs = ("logits", "features", "gradnorm")

    def __init__(self, T: float = 1.0, parameter: str = "head"):
        self.T = T
        self.parameter = parameter

    def network_outputs(self, network, rows) -> dict[str, np.ndarray]:
        if not (np.isfinite(self.T) and self.T > 0):
            raise ValueError(f"{self.name}: T must be > 0, got {self.T}")
        from methods.network_passes import gradnorm_outputs  # torch: only when the network runs

        return gradnorm_outputs(network, rows.images, self.T, self.parameter)

    def score_samples(self, split) -> np.ndarray:
        scores = np.asarray(self.derived(split).array("gradnorm"), np.float64)
        if not np.isfinite(scores).all():
            raise ValueError(f"{split_name(split)}: {self.name} produced NaN or infinite gradient norms; check the "
                             "backbone's weights")
        return scores


def fit_ensemble(id_confidences: np.ndarray, ood_confidences: np.ndarray) -> dict:
    """The Mahalanobis ensemble's weights and input noise (Lee et al. 2018): inputs are per-layer
    confidences M (n, L, E) of held-out ID images and (m, L, E) of the samples tuned against (FGSM
    copies of the ID images in the UM/ReAct/GradNorm code, or a validation OOD set), for each
    candidate epsilon. For each epsilon, sklearn's LogisticRegressionCV (default settings)
    separates ID (0) from (pseudo-)OOD (1) on the first half of each; its score S = -P(1 | M) is
    evaluated on the second halves by FPR at 95% TPR (ID positive). The epsilon with the lowest FPR
    (the first on ties) is chosen, with that logistic regression. The weights are unconstrained, as
    in the original: a layer may get a weight of the "wrong" sign (docs/methods.md, "The Mahalanobis
    ensemble on noise")."""
    from sklearn.linear_model import LogisticRegressionCV

    from results.metrics import fpr_at_tpr

    half_id, half_ood = len(id_confidences) // 2, len(ood_confidences) // 2
    fits, fprs = [], []
    for e in range(id_confidences.shape[2]):
        features = np.concatenate([id_confidences[:half_id, :, e], ood_confidences[:half_ood, :, e]])
        targets = np.r_[np.zeros(half_id), np.ones(half_ood)]
        with warnings.catch_warnings():  # sklearn's notices of future default changes; these are today's defaults
            warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
            regression = LogisticRegressionCV(scoring="accuracy").fit(features, targets)  # the default, made explicit
        scores = [-regression.predict_proba(m[half:, :, e])[:, 1]
                  for m, half in ((id_confidences, half_id), (ood_confidences, half_ood))]
        fits.append(regression)
        fprs.append(fpr_at_tpr(*scores))
    best = int(np.argmin(fprs))
    return {"epsilon_index": best, "coef": fits[best].coef_[0], "intercept": float(fits[best].intercept_[0]),
            "selection_fpr95": np.asarray(fprs)}


def ensemble_score(confidences: np.ndarray, coef: np.ndarray, intercept: float) -> np.ndarray:
    """S = -P_LR(pseudo-OOD | M) = -sigmoid(w . M + b) for per-layer confidences M (N, L)."""
    logit = np.asarray(confidences, np.float64) @ np.asarray(coef, np.float64) + intercept
    return -0.5 * (1.0 + np.tanh(0.5 * logit))  # sigmoid without overflow


@register
class MahalanobisEnsemble(NetworkMethod):
    """The original Mahalanobis detector (Lee et al. 2018; METHODS.md 1.5a, "mahalanobis_ens").

    Each named layer's output is averaged over space, f_l(x); class means mu_{l,c} and one tied
    covariance Sigma_l (MLE of the class-centred features, float64, P_l = pseudo-inverse) are fit
    on the ID fit split. Per layer, the input moves toward its closest class, x_tilde = x - epsilon *
    sign(grad_x 1/2 (f_l - mu_c_hat)^T P_l (f_l - mu_c_hat)) (epsilon in pixel units, as ODIN), and
    M_l = max_c -1/2 (f_l(x_tilde) - mu_{l,c})^T P_l (f_l(x_tilde) - mu_{l,c}). A logistic regression on
    [M_1..M_L] gives S = -P_LR(OOD | M).

    The regression and epsilon are chosen on ``holdout`` images (at most half the split) drawn
    (seeded) from the ID fit split - never on test data, unlike the UM code, which tunes on the first 1000 test images -
    against, with ``tune_on='fgsm'`` (the UM/ReAct/GradNorm protocol), FGSM copies of them (x + ``fgsm`` *
    sign(grad CE), clipped to [0,1]) as pseudo-OOD, or with ``tune_on='validation'`` (real OOD data, as Lee
    et al. tuned), up to ``holdout`` seeded images of the benchmark's validation OOD set. The class statistics
    come from the rest of the fit split. ``layers``: comma-separated module names, or 'backbone' for the
    backbone's named layers. The regression's weights are unconstrained: tuned on FGSM copies it can give a
    layer a weight of the wrong sign, which ranks far-away inputs such as noise as ID (docs/methods.md,
    "The Mahalanobis ensemble on noise").
    """

    name = "mahalanobis_ens"
    outputs = ("logits", "features", "confidences")
    fits_through_network = True

    def __init__(self, layers: str = BACKBONE_LAYERS, holdout: int = 1000, fgsm: float = 0.05, seed: int = 0,
                 tune_on: str = "fgsm"):
        self.layers = layers
        self.holdout = holdout
        self.fgsm = fgsm
        self.seed = seed
        self.tune_on = tune_on

    def _check(self) -> None:
        if self.tune_on not in MAHALANOBIS_TUNING:
            raise ValueError(f"{self.name}: tune_on must be one of {MAHALANOBIS_TUNING}, got {self.tune_on!r}")

    @property
    def needs_validation_set(self) -> bool:
        self._check()
        return self.tune_on == "validation"

    def network_key(self, declared: dict | None = None) -> dict:
        """Every parameter, less the one the tuning does not use: ``fgsm`` when tuned on the validation
        set, ``tune_on`` itself for the default FGSM tuning (so its key, and its cached fits and outputs,
        are the ones computed before the parameter existed). A validation-tuned fit is keyed by the
        validation set's entry as well, by the harness (``needs_validation_set``)."""
        self._check()
        key = super().network_key(declared)
        del key["fgsm" if key["tune_on"] == "validation" else "tune_on"]
        return key

    def layer_names(self, network) -> tuple[str, ...]:
        names = network.backbone.layers if self.layers == BACKBONE_LAYERS else \
            tuple(name.strip() for name in self.layers.split(",") if name.strip())
        if not names or "penultimate" in names:
            raise ValueError(f"{self.name}: needs module names (layers=a,b,...); backbone {network.backbone.name!r} "
                             f"names {list(network.backbone.layers) or 'none'}")
        return tuple(resolve_layer(network, name) for name in names)

    def network_fit(self, network, rows, passes, validation=None) -> dict[str, np.ndarray]:
        from methods.network_passes import layer_features, mahalanobis_confidences  # torch: only when it runs

        if self.needs_validation_set and validation is None:
            raise ValueError(f"{self.name}: tune_on='validation' tunes the regression on the benchmark's validation "
                             "OOD set, and none was given (name one under `validation:` in the benchmark file)")
        layers = self.layer_names(network)
        labels = np.asarray(rows.cached("labels"))
        n_classes = rows.cached("logits").shape[1]
        n_held = min(int(self.holdout), len(labels) // 2)
        if n_held < 10:  # each half needs 5 ID samples: LogisticRegressionCV's 5 stratified folds
            raise ValueError(f"{self.name}: holdout must be >= 10 (and the fit split at least 20 samples); got "
                             f"holdout {self.holdout} with a fit split of {len(labels)}")
        order = np.random.default_rng(self.seed).permutation(len(labels))
        held, rest = np.sort(order[:n_held]), np.sort(order[n_held:])
        features = passes("class-statistics", len(rest), layers,
                          lambda start, stop: layer_features(network, rows.images[rest[start:stop]], layers))
        state, stats = {}, {}
        for layer in layers:
            try:
                means, covariance = class_means_and_tied_covariance(features[layer], labels[rest], n_classes)
            except ValueError as err:
                raise ValueError(f"{self.name}: layer {layer}: {err}") from err
            stats[layer] = (means, pinv_precision(covariance))
            state[f"means/{layer}"], state[f"precision/{layer}"] = stats[layer]

        def confidences(step, images, chosen, fgsm):
            def compute(start, stop):
                part = chosen[start:stop]
                return {"m": mahalanobis_confidences(network, images[part], layers, stats, MAHALANOBIS_EPSILONS,
                                                     fgsm=None if fgsm is None else (labels[part], fgsm))}
            return passes(step, len(chosen), ("m",), compute)["m"]

        id_confidences = confidences("holdout-id", rows.images, held, None)
        if self.tune_on == "validation":
            n_ood = min(n_held, len(validation.images))
            if n_ood < 10:
                raise ValueError(f"{self.name}: the validation OOD set has {len(validation.images)} images; tuning "
                                 "on it needs at least 10")
            tuned = {"validation_rows": np.sort(
                np.random.default_rng([self.seed, 1]).permutation(len(validation.images))[:n_ood])}
            ood_confidences = confidences("validation-ood", validation.images, tuned["validation_rows"], None)
        else:
            tuned = {}
            ood_confidences = confidences("holdout-fgsm", rows.images, held, self.fgsm)
        chosen = fit_ensemble(id_confidences, ood_confidences)
        return {**state, "epsilon": np.array([MAHALANOBIS_EPSILONS[chosen["epsilon_index"]]]),
                "epsilons": np.array(MAHALANOBIS_EPSILONS), "selection_fpr95": chosen["selection_fpr95"],
                "coef": chosen["coef"], "intercept": np.array([chosen["intercept"]]), "holdout_rows": held, **tuned}

    def load_state(self, state) -> "MahalanobisEnsemble":
        self.state_ = state
        self.epsilon_ = float(state.array("epsilon")[0])
        self.coef_ = state.array("coef")
        self.intercept_ = float(state.array("intercept")[0])
        return self

    def network_outputs(self, network, rows) -> dict[str, np.ndarray]:
        from methods.network_passes import mahalanobis_confidences  # torch: only when the network runs

        check_fitted(self, "state_")
        layers = self.layer_names(network)
        stats = {layer: (self.state_.array(f"means/{layer}"), self.state_.array(f"precision/{layer}"))
                 for layer in layers}
        confidences = mahalanobis_confidences(network, rows.images, layers, stats, (self.epsilon_,))[:, :, 0]
        return {"logits": rows.cached("logits").astype(np.float64), "features": rows.cached("features"),
                "confidences": confidences}

    def score_samples(self, split) -> np.ndarray:
        check_fitted(self, "coef_")
        return ensemble_score(self.derived(split).array("confidences"), self.coef_, self.intercept_)
