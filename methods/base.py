"""The scoring interface shared by every method, built-in or plugin, and the name registry.

scikit-learn habits: the constructor only stores hyperparameters (as attributes of the same
name); ``fit(split)`` learns state into attributes ending in ``_``; ``score_samples(split)``
returns one float64 per sample, **higher = more in-distribution**, computed per sample so batch
composition does not matter. ``Method`` states the whole contract; ``SplitView`` enforces what a
method may read.

Batch independence is a tolerance, not bit identity: a sample's score in a shuffled, cut or
reversed split equals its score in the whole split to 1e-12 relative, so ranks and metrics agree
wherever scores differ by more than that (tests/conftest.py, ``assert_batch_invariant``). Bit
identity cannot be promised: BLAS may round a row of a matrix product by where the row falls in
the product (OpenBLAS's SkylakeX dgemm does, for rows next to its block and thread boundaries;
its Haswell kernels did not in our tests), and which kernel runs depends on the CPU, the thread
count and the library version. Fixed-shape products do not help: a row's position within the
block still changes with the batching.

A method is named by a *reference*: a registered name (``energy``), ``module:Class`` for a class
anywhere on the Python path, or the name of an installed plugin (the ``oodbench.methods``
entry-point group). ``method_class`` resolves references; ``make_method`` instantiates them.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import itertools
import marshal
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np

METHODS: dict[str, type["Method"]] = {}
ENTRY_POINT_GROUP = "oodbench.methods"
BUILTIN_PACKAGE = "methods"  # classes defined in this package are the built-ins, versioned by hand
BLOCK_ROWS = 1024  # rows per block of rowwise_apply, the shaping passes and Mahalanobis: bounds float64 temporaries
# What a method may declare in ``reads``: the cached arrays of a split, inner-layer activations,
# and "network" (the method computes its own outputs through the network: ``NetworkMethod``).
READABLE = ("logits", "features", "head", "labels", "activations", "network")
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]*")


@functools.cache
def _code_digest(cls: type) -> str:
    """``Method.code_key`` of a plugin class: read and hashed once, not per set scored."""
    digest = hashlib.sha256()
    for klass in cls.__mro__:
        if klass is object or getattr(klass, "__module__", "").partition(".")[0] == BUILTIN_PACKAGE:
            continue
        try:
            digest.update(inspect.getsource(sys.modules[klass.__module__]).encode())
            digest.update(inspect.getsource(klass).encode())
        except (OSError, TypeError, KeyError):
            for attribute, value in sorted(vars(klass).items()):
                code = getattr(inspect.unwrap(value) if callable(value) else value, "__code__", None)
                digest.update(attribute.encode() + (marshal.dumps(code) if code else repr(value).encode()))
    return digest.hexdigest()[:16]


class Method:
    """An OOD score. Subclass it, set ``name`` and ``reads``, implement ``score_samples``.

    The contract (the built-ins obey it, and the harness enforces it):

    - ``__init__`` only stores its hyperparameters, each as an attribute of the same name, all
      with defaults (they are the method's cache key, its CLI ``--param`` names and its sweep axes).
    - ``fit(split)`` learns state from the ID fit split into attributes ending in ``_`` and
      returns ``self``. Stateless methods need not define it.
    - ``score_samples(split)`` returns an array of shape (N,), one finite float per sample,
      **higher = more in-distribution**, each computed from that sample alone: no dependence on
      the other samples of the split or their order (to 1e-12 relative).
    - ``predict(split)`` returns the predicted class per sample (N,) from the logits the method
      actually uses (ID accuracy; a method that reshapes the forward pass predicts from the
      reshaped logits). The default is the argmax of the cached logits.
    - What a method may touch is what it declares in ``reads`` (a subset of ``READABLE``): the
      split's ``logits`` (N, C), ``features`` (N, D) penultimate, ``head`` (W (C, D), b (C,)),
      ``activations(layer)`` (inner layers the benchmark caches) and ``labels`` (N,) -- labels of
      the **fit split only**: the splits a method scores never show their labels. A method that
      needs the network declares ``"network"`` and subclasses ``methods.network_scores.NetworkMethod``.
      The harness hands a method a ``SplitView`` that raises on anything undeclared.
    - ``grid`` maps hyperparameters to the values a sweep tries; ``version`` is bumped when the
      math or its rounding changes. A plugin's cached scores are also keyed by its source code
      (``code_key``), so editing it re-scores it and nothing else.

    The names follow scikit-learn: ``score_samples`` as in ``IsolationForest.score_samples``
    (higher = more normal); ``score`` is the old name of ``score_samples`` (deprecated alias).
    """

    name: str = ""
    reads: tuple[str, ...] = ("logits",)
    grid: dict[str, list] = {}
    fits_on: str = "fit"  # the split fit() receives: "fit" (the ID fit split) or "val" (the ID validation split)
    # a parameter whose settings one computation scores together (``score_samples_sweep``), or None
    sweep_axis: str | None = None
    # bump when the math or its rounding changes, so cached scores are recomputed
    # (2: own log-sum-exp and softmax, 1024-row products; 3: plain matrix products, without the
    # zero-padded fixed-shape 1,024-row blocks, so products round a little differently)
    version: int = 3

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "score" in cls.__dict__ and "score_samples" not in cls.__dict__:  # written against the old name
            warnings.warn(f"{cls.__module__}.{cls.__qualname__} defines score(); the method is now called "
                          "score_samples (score is a deprecated alias)", DeprecationWarning, stacklevel=2)
            cls.score_samples = cls.__dict__["score"]

    @classmethod
    def defaults(cls) -> dict:
        """Hyperparameters and their defaults, read from the constructor's signature."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in parameters
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    @classmethod
    def is_builtin(cls) -> bool:
        return cls.__module__.partition(".")[0] == BUILTIN_PACKAGE

    @classmethod
    def code_key(cls) -> str:
        """A digest of a plugin's code: the source of every module defining a class of its MRO
        outside this package (the bytecode of their functions where the source cannot be read,
        e.g. a class typed into a REPL). Empty for the built-ins, which are keyed by ``version``.
        Computed once per class object (an edited plugin is imported again as a new class)."""
        return "" if cls.is_builtin() else _code_digest(cls)

    def get_params(self, deep: bool = True) -> dict:
        """The hyperparameters as a dict (scikit-learn's ``get_params``; ``deep`` is accepted for
        compatibility: methods hold no nested estimators)."""
        return {name: getattr(self, name) for name in self.defaults()}

    def set_params(self, **params) -> "Method":
        """Change hyperparameters (checked like ``make_method``'s); fitted state is dropped by
        ``clone``, not here, as in scikit-learn."""
        for name, value in _checked_params(type(self), params).items():
            setattr(self, name, value)
        return self

    def clone(self) -> "Method":
        """A new, unfitted instance with the same hyperparameters (``sklearn.base.clone``)."""
        return type(self)(**self.get_params())

    def fit(self, split) -> "Method":
        """Learn state from the fit split (ID training data). Stateless methods return self."""
        return self

    def score_samples(self, split) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__qualname__} must implement score_samples(split)")

    def score_samples_sweep(self, split, values: list) -> list[np.ndarray]:
        """Scores for each value of ``sweep_axis`` from one computation, fitted with the setting that
        covers them all (KNN: one search with the largest k serves every k)."""
        raise NotImplementedError(f"{type(self).__qualname__} has no sweep_axis to score together")

    def score(self, split) -> np.ndarray:
        """Deprecated alias of ``score_samples`` (in scikit-learn, ``score`` returns one number)."""
        warnings.warn("Method.score(split) is now score_samples(split)", DeprecationWarning, stacklevel=2)
        return self.score_samples(split)

    def predict(self, split) -> np.ndarray:
        """Predicted class per sample from the logits this method uses (for ID accuracy)."""
        return finite_logits(split).argmax(axis=1)

    def score_and_predict(self, split) -> tuple[np.ndarray, np.ndarray]:
        """``(score_samples(split), predict(split))``; methods whose both come from one costly
        computation (the shaped logits of ReAct, DICE, ASH) override it to compute that once."""
        return self.score_samples(split), self.predict(split)

    def label(self) -> str:
        """Display name with the hyperparameters that differ from the defaults, e.g. 'energy(T=2)'."""
        changed = {k: v for k, v in self.get_params().items() if v != self.defaults()[k]}
        shown = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items())
        return self.name + (f"({shown})" if changed else "")


class UndeclaredRead(ValueError):
    """A method read a part of a split it did not declare in ``reads`` (or the labels of a split it scores)."""


class SplitView:
    """What a method sees of a split: the parts it declares in ``reads``, nothing else.

    ``labels`` only when fitting (``fitting=True``) and declared. Network methods (``"network"``)
    read their own derived entry, so they also see its ``meta`` and ``array(name)``.
    """

    def __init__(self, split, method: Method, fitting: bool = False):
        self._split, self._method, self._fitting = split, method, fitting
        self._reads = set(method.reads)
        self.name = split_name(split)

    def __len__(self) -> int:
        return len(self._split)

    def _get(self, part: str):
        if part not in self._reads and not ("network" in self._reads and part != "labels"):
            raise UndeclaredRead(f"method {self._method.name!r} read {part!r} of {self.name}, but its reads are "
                                 f"{tuple(self._method.reads)}; add {part!r} to its class's reads")
        if part == "labels" and not self._fitting:
            raise UndeclaredRead(f"method {self._method.name!r} read the labels of {self.name}, a split it scores; "
                                 "labels are given to fit only, on the ID fit split")
        return getattr(self._split, part)

    logits = property(lambda self: self._get("logits"))
    features = property(lambda self: self._get("features"))
    head = property(lambda self: self._get("head"))
    labels = property(lambda self: self._get("labels"))

    def activations(self, layer: str) -> np.ndarray:
        self._get("activations")
        return self._split.activations(layer)

    @property
    def meta(self) -> dict:
        return self._get("meta") if "network" in self._reads else {}

    def array(self, name: str) -> np.ndarray:
        self._get("array")
        return self._split.array(name)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's, taskset's or Slurm job's
    share of a shared machine); every core where there is no mask (macOS)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to ``METHODS`` under ``cls.name`` (built-ins, and plugins
    that want a short name once their module is imported)."""
    check_method_class(cls, f"{cls.__module__}:{cls.__qualname__}")
    if cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is registered twice ({METHODS[cls.name].__module__} and "
                         f"{cls.__module__}); give one of them another name")
    METHODS[cls.name] = cls
    return cls


def check_method_class(cls, reference: str) -> None:
    """One clear error when what ``reference`` names cannot be a method."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"method {reference!r} is {cls!r}, not a subclass of methods.Method")
    if not isinstance(cls.name, str) or not NAME_PATTERN.fullmatch(cls.name):
        raise ValueError(f"method {reference!r} needs a class attribute name: a short identifier for tables and "
                         f"the cache (letters, digits, _ . + -), got {cls.name!r}")
    unknown = sorted(set(cls.reads) - set(READABLE))
    if unknown or isinstance(cls.reads, str):
        raise ValueError(f"method {reference!r}: reads must be a tuple drawn from {', '.join(READABLE)}, "
                         f"got {cls.reads!r}")
    empty = [name for name, default in cls.defaults().items() if default is inspect.Parameter.empty]
    if empty:
        raise ValueError(f"method {reference!r}: every constructor parameter needs a default (the registry and "
                         f"sweeps build it without arguments); {', '.join(empty)} has none")


def _entry_points() -> dict:
    return {point.name: point for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def installed_plugins() -> dict[str, str]:
    """Methods installed packages register (the ``oodbench.methods`` entry points): name -> 'module:Class'."""
    return {name: point.value for name, point in sorted(_entry_points().items())}


def _import_module(name: str):
    """``importlib.import_module(name)``; a module not found on the path is looked for in the
    current folder too, last (``oodbench`` run from the folder of a plugin, as ``python -m`` would)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        here = os.getcwd()
        if err.name != name.partition(".")[0] or here in sys.path or not (
                Path(here, f"{err.name}.py").is_file() or Path(here, err.name).is_dir()):
            raise
        sys.path.append(here)  # kept: scoring workers (joblib) inherit the path and import it again
        return importlib.import_module(name)


def _import_object(reference: str):
    module_name, _, attribute = reference.partition(":")
    try:
        module = _import_module(module_name)
    except ImportError as err:
        raise ValueError(f"method {reference!r}: cannot import module {module_name!r} ({err}); is it installed, "
                         "or on PYTHONPATH (run from the folder holding it)?") from err
    except Exception as err:  # the plugin's own import-time code failed
        raise ValueError(f"method {reference!r}: importing {module_name!r} raised {type(err).__name__}: {err}") \
            from err
    found = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ValueError(f"method {reference!r}: module {module_name!r} has no attribute {attribute!r}")
        found = getattr(found, part)
    return found


def method_class(reference) -> type[Method]:
    """The class a method reference names (a ``Method`` subclass is returned as it is)."""
    if isinstance(reference, type):
        check_method_class(reference, f"{reference.__module__}:{reference.__qualname__}")
        return reference
    if not isinstance(reference, str) or not reference:
        raise ValueError(f"a method is named by a string (a registered name or 'module:Class'), got {reference!r}")
    if ":" in reference:
        cls = _import_object(reference)
    elif reference in METHODS:
        return METHODS[reference]
    else:
        points = _entry_points()
        if reference not in points:
            plugins = f"; installed plugins: {', '.join(sorted(points))}" if points else ""
            raise ValueError(f"unknown method {reference!r}; registered methods: {', '.join(sorted(METHODS))}"
                             f"{plugins}; a method of your own is named 'module:Class'")
        cls = _import_object(points[reference].value)
    check_method_class(cls, reference)
    builtin = METHODS.get(cls.name)
    if builtin is not None and builtin is not cls:
        raise ValueError(f"method {reference!r} has name {cls.name!r}, which the built-in {builtin.__module__}."
                         f"{builtin.__qualname__} uses; set another name in the class (name = '...')")
    return cls


def method_reference(cls: type[Method]) -> str:
    """The reference that names ``cls`` again: its registered name, else 'module:Class'."""
    return cls.name if METHODS.get(cls.name) is cls else f"{cls.__module__}:{cls.__qualname__}"


def _coerce(value, default):
    """Parse a CLI string to the type of the default (float/int/bool), leaving other values alone."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {value!r}")
        return value.lower() in ("true", "1")
    return type(default)(value)


def _checked_params(cls: type[Method], params: dict) -> dict:
    """``params`` for ``cls``, CLI strings parsed to the defaults' types, with one clear error for
    unknown names or bad values."""
    defaults = cls.defaults()
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        valid = ", ".join(f"{k} (default {v})" for k, v in defaults.items()) or "none"
        raise ValueError(f"method {cls.name!r} has no parameter {', '.join(unknown)}; its parameters: {valid}")
    try:
        return {k: _coerce(v, defaults[k]) for k, v in params.items()}
    except ValueError as err:
        raise ValueError(f"method {cls.name!r}: bad parameter value ({err})") from err


def make_method(reference, **params) -> Method:
    """Instantiate the method ``reference`` names (``method_class``), with one clear error for
    unknown names or parameters, or a constructor that breaks the contract."""
    cls = method_class(reference)
    parsed = _checked_params(cls, params)
    if cls.is_builtin():
        return cls(**parsed)
    try:
        method = cls(**parsed)
    except Exception as err:
        raise ValueError(f"method {cls.name!r} ({method_reference(cls)}): its constructor raised "
                         f"{type(err).__name__}: {err}") from err
    missing = [name for name in cls.defaults() if not hasattr(method, name)]
    if missing:
        raise ValueError(f"method {cls.name!r} ({method_reference(cls)}): __init__ must store each parameter as an "
                         f"attribute of the same name (scikit-learn's convention); missing {', '.join(missing)}")
    return method


def parameter_grid(name: str, overrides: dict[str, list] | None = None) -> list[dict]:
    """Every combination of a registered method's ``grid`` (the registry's sweep values), with
    ``overrides`` replacing or adding axes; parameters are checked by ``make_method``."""
    axes = {**make_method(name).grid, **(overrides or {})}
    points = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    for point in points:
        make_method(name, **point)
    return points


def check_fitted(method: Method, *attributes: str) -> None:
    """One clear error when ``score_samples``/``predict`` runs before ``fit`` learned ``attributes``."""
    missing = [a for a in attributes if getattr(method, a, None) is None]
    if missing:
        raise ValueError(f"{method.name}: call fit(split) on the ID fit split before score_samples/predict; "
                         f"missing fitted state {', '.join(missing)}")


class NonFiniteOutputs(ValueError):
    """A method produced NaN or infinite scores, or a network method NaN or infinite logits or
    features (e.g. a shaping whose rescaling overflows on a backbone's activations): that method
    cannot score that backbone."""


class MethodFailed(ValueError):
    """A plugin method raised, or a method returned outputs of the wrong shape or type: the harness
    leaves that method out of that backbone and goes on with the others."""


@contextlib.contextmanager
def blamed_on(method: Method, what: str):
    """Run a method's own code (``what``: e.g. 'fit on fashion-mnist/train'): an exception a plugin
    raises becomes one ``MethodFailed`` naming the plugin; a built-in's propagates (a bug of this
    package); the harness's own errors (a missing or corrupt cache, a full disk) pass as they are."""
    try:
        yield
    except (MethodFailed, NonFiniteOutputs, UndeclaredRead):
        raise
    except Exception as err:
        if method.is_builtin() or type(err).__module__.partition(".")[0] == "extract":
            raise
        raise MethodFailed(f"method {method.name!r} ({method_reference(type(method))}) raised "
                           f"{type(err).__name__} in {what}: {err}") from err


def checked_outputs(method: Method, split, scores, predictions) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, predictions)`` of ``method`` on ``split`` as float64 and integer arrays of shape
    (N,), or one ``MethodFailed`` saying what is wrong (NaN scores are the caller's check)."""
    n, name = len(split), split_name(split)
    scores, predictions = np.asarray(scores), np.asarray(predictions)
    who = f"method {method.name!r} ({method_reference(type(method))})"
    if scores.shape != (n,) or not (np.issubdtype(scores.dtype, np.number) or scores.dtype == bool):
        raise MethodFailed(f"{who}: score_samples on {name} returned {scores.dtype} of shape {scores.shape}; it must "
                           f"return one number per sample, shape ({n},)")
    if predictions.shape != (n,) or not np.issubdtype(predictions.dtype, np.integer):
        raise MethodFailed(f"{who}: predict on {name} returned {predictions.dtype} of shape {predictions.shape}; it "
                           f"must return one integer class per sample, shape ({n},)")
    return scores.astype(np.float64), predictions


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
