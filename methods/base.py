"""The scoring interface shared by every method, and the name registry.

scikit-learn habits: the constructor only stores hyperparameters (as attributes of the same
name); ``fit(split)`` learns state into attributes ending in ``_``; ``score(split)`` returns one
float64 per sample, **higher = more in-distribution**, computed per sample so batch composition
does not matter. A split is anything with the arrays the method declares in ``reads``
(``extract.store.CachedSplit`` for cached entries): ``logits``, ``features``, ``labels``,
``head`` (W, b) or ``activations(layer)``.

Batch independence is a tolerance, not bit identity: a sample's score in a shuffled, cut or
reversed split equals its score in the whole split to 1e-12 relative, so ranks and metrics agree
wherever scores differ by more than that (tests/conftest.py, ``assert_batch_invariant``). Bit
identity cannot be promised: BLAS may round a row of a matrix product by where the row falls in
the product (OpenBLAS's SkylakeX dgemm does, for rows next to its block and thread boundaries;
its Haswell kernels did not in our tests), and which kernel runs depends on the CPU, the thread
count and the library version. Fixed-shape products do not help: a row's position within the
block still changes with the batching.
"""
from __future__ import annotations

import inspect
import itertools

import numpy as np

METHODS: dict[str, type["Method"]] = {}
BLOCK_ROWS = 1024  # rows per block of rowwise_apply, the shaping passes and Mahalanobis: bounds float64 temporaries


class Method:
    """Base class: subclasses set ``name``, ``reads``, ``grid`` and implement ``score``."""

    name: str = ""
    reads: tuple[str, ...] = ("logits",)
    grid: dict[str, list] = {}
    # bump when the math or its rounding changes, so cached scores are recomputed
    # (2: own log-sum-exp and softmax, 1024-row products; 3: plain matrix products, without the
    # zero-padded fixed-shape 1,024-row blocks, so products round a little differently)
    version: int = 3

    @classmethod
    def defaults(cls) -> dict:
        """Hyperparameters and their defaults, read from the constructor's signature."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in parameters
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def get_params(self) -> dict:
        return {name: getattr(self, name) for name in self.defaults()}

    def fit(self, split) -> "Method":
        """Learn state from the fit split (ID training data). Stateless methods return self."""
        return self

    def score(self, split) -> np.ndarray:
        raise NotImplementedError

    def predict(self, split) -> np.ndarray:
        """Predicted class per sample from the logits this method uses (for ID accuracy)."""
        return finite_logits(split).argmax(axis=1)

    def score_and_predict(self, split) -> tuple[np.ndarray, np.ndarray]:
        """``(score(split), predict(split))``; methods whose both come from one costly computation
        (the shaped logits of ReAct, DICE, ASH) override it to compute that once."""
        return self.score(split), self.predict(split)

    def label(self) -> str:
        """Display name with the hyperparameters that differ from the defaults, e.g. 'energy(T=2)'."""
        changed = {k: v for k, v in self.get_params().items() if v != self.defaults()[k]}
        shown = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items())
        return self.name + (f"({shown})" if changed else "")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to ``METHODS`` under ``cls.name``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    METHODS[cls.name] = cls
    return cls


def _coerce(value, default):
    """Parse a CLI string to the type of the default (float/int/bool), leaving other values alone."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {value!r}")
        return value.lower() in ("true", "1")
    return type(default)(value)


def make_method(name: str, **params) -> Method:
    """Instantiate a registered method, with one clear error for unknown names or parameters."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    defaults = cls.defaults()
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        valid = ", ".join(f"{k} (default {v})" for k, v in defaults.items()) or "none"
        raise ValueError(f"method {name!r} has no parameter {', '.join(unknown)}; its parameters: {valid}")
    try:
        parsed = {k: _coerce(v, defaults[k]) for k, v in params.items()}
    except ValueError as err:
        raise ValueError(f"method {name!r}: bad parameter value ({err})") from err
    return cls(**parsed)


def parameter_grid(name: str, overrides: dict[str, list] | None = None) -> list[dict]:
    """Every combination of a registered method's ``grid`` (the registry's sweep values), with
    ``overrides`` replacing or adding axes; parameters are checked by ``make_method``."""
    axes = {**make_method(name).grid, **(overrides or {})}
    points = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    for point in points:
        make_method(name, **point)
    return points


def check_fitted(method: Method, *attributes: str) -> None:
    """One clear error when ``score``/``predict`` runs before ``fit`` learned ``attributes``."""
    missing = [a for a in attributes if getattr(method, a, None) is None]
    if missing:
        raise ValueError(f"{method.name}: call fit(split) on the ID fit split before score/predict; "
                         f"missing fitted state {', '.join(missing)}")


class NonFiniteOutputs(ValueError):
    """A method produced NaN or infinite scores, or a network method NaN or infinite logits or
    features (e.g. a shaping whose rescaling overflows on a backbone's activations): that method
    cannot score that backbone."""


def split_name(split) -> str:
    """How errors name a split ('fashion-mnist/test' for cache entries)."""
    return getattr(split, "name", "split")


def finite_features(split, n_rows: int | None = None, dtype=np.float64) -> np.ndarray:
    """The split's penultimate features (N, D) as ``dtype`` (None: as stored, e.g. the cache's
    float32, for ``rowwise_apply``), with one clear error if they are not 2-D, do not have
    ``n_rows`` rows (one per logit row), or hold NaN or infinite values."""
    name = split_name(split)
    features = np.asarray(split.features, dtype=dtype)
    if features.ndim != 2:
        raise ValueError(f"{name}: features must be 2-D (N, D), got shape {features.shape}")
    if n_rows is not None and features.shape[0] != n_rows:
        raise ValueError(f"{name}: {features.shape[0]} feature rows but {n_rows} logit rows; the cache entry "
                         "is inconsistent - re-extract")
    bad = ~np.isfinite(features)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"{name}: {len(rows)} of {len(features)} samples have NaN or infinite features "
                         f"(first row {rows[0]}); check the backbone and re-extract")
    return features


def finite_head(split, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """The classifier head (W (C, D), b (C,)) as float64, checked against the feature width and for
    NaN or infinite values."""
    weight, bias = (np.asarray(a, dtype=np.float64) for a in split.head)
    name = split_name(split)
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: head must be W (C, D) and b (C,), got {weight.shape} and {bias.shape}")
    if weight.shape[1] != n_features:
        raise ValueError(f"{name}: head W has {weight.shape[1]} input dims but the features have {n_features}")
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise ValueError(f"{name}: the classifier head (W, b) holds NaN or infinite values; the checkpoint is "
                         "broken - check the weights, then re-extract")
    return weight, bias


def finite_logits(split, dtype=np.float64) -> np.ndarray:
    """The split's logits as ``dtype`` (None: as stored), with one clear error if any are NaN or
    infinite."""
    logits = np.asarray(split.logits, dtype=dtype)
    bad = ~np.isfinite(logits)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"{split_name(split)}: {len(rows)} of {len(logits)} samples have NaN or "
                         f"infinite logits (first row {rows[0]}); the backbone diverged or its checkpoint is "
                         "broken - check the weights and preprocessing, then re-extract")
    return logits


def rowwise_apply(function, *arrays: np.ndarray, rows: int = BLOCK_ROWS) -> np.ndarray:
    """``function(*arrays)`` for a function of each row alone, evaluated on blocks of ``rows`` rows
    (each block converted to float64) and concatenated along the first axis.

    The values are those of one call on the whole float64 arrays (to the rounding of any matrix
    product inside ``function``, see the module docstring); what changes is the memory: a few
    block-sized temporaries instead of whole-split float64 copies (an ImageNet-sized split is
    gigabytes of fresh memory otherwise, and writing fresh memory is slower than the math).
    """
    blocks = [function(*(np.asarray(a[start:start + rows], np.float64) for a in arrays))
              for start in range(0, len(arrays[0]), rows)]
    return np.concatenate(blocks) if blocks else function(*(np.asarray(a, np.float64) for a in arrays))


def log_sum_exp(x: np.ndarray) -> np.ndarray:
    """log sum_j exp(x_ij) per row, in float64 with the row maximum subtracted first.

    The same value as scipy.special.logsumexp(x, axis=1) (to rounding), about 20x faster on
    large arrays (no masking of infinities: callers pass finite values).
    """
    peak = x.max(axis=1).astype(np.float64)  # a row maximum is exact in any float dtype: no full copy
    shifted = np.subtract(x, peak[:, None], dtype=np.float64)
    np.exp(shifted, out=shifted)
    return np.log(shifted.sum(axis=1)) + peak


def softmax_rows(x: np.ndarray) -> np.ndarray:
    """softmax(x) per row, in float64 with the row maximum subtracted first."""
    shifted = np.subtract(x, x.max(axis=1).astype(np.float64)[:, None], dtype=np.float64)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1)[:, None]
    return shifted
