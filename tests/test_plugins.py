"""Methods from outside the repository: `module:Class` references, entry-point plugins, their
cache keys, their failures, and the shipped example (examples/cosine_scores.py) end to end."""
import textwrap
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import methods
from extract.store import read_meta
from methods.base import Method, SplitView, UndeclaredRead, make_method, method_class
from tests.conftest import oodbench

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE = "cosine_scores:CosineToClassMeans"


def h5_arrays_at(path: Path, *names: str) -> list[np.ndarray]:
    with h5py.File(path, "r") as h5:
        return [h5[name][()] for name in names]


def h5_arrays(cache: Path, pattern: str, *names: str) -> list[np.ndarray]:
    [path] = [p for p in cache.glob(f"*/{pattern}.*.h5")]
    return h5_arrays_at(path, *names)


def cosine_reference(fit_features, fit_labels, features, top):
    """The example's score, written out again: mean of the top cosines to the class means."""
    means = np.stack([fit_features[fit_labels == c].mean(axis=0) for c in range(fit_labels.max() + 1)])
    cos = np.array([[f @ m / (np.linalg.norm(f) * np.linalg.norm(m)) for m in means] for f in features])
    return np.sort(cos, axis=1)[:, ::-1][:, :top].mean(axis=1)


def write_plugin(folder: Path, module: str, body: str) -> str:
    """A plugin module ``module`` in ``folder`` (on sys.path in the test) with class ``Plugin``."""
    (folder / f"{module}.py").write_text("import numpy as np\nfrom methods import Method\n\n\n"
                                         + textwrap.dedent(body))
    return f"{module}:Plugin"


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return folder


@pytest.mark.slow
def test_example_plugin_scores_sweeps_and_runs_through_the_cli(cache_copy, tmp_path, capsys, plugins, forwards):
    out = tmp_path / "out"
    code, printed, err = oodbench(capsys, "score", "digits", "--method", EXAMPLE, "--param", "top=2",
                                  "--cache-dir", cache_copy, "--out", out, "--quiet")
    assert code == 0, err
    assert forwards == []  # from the cache alone
    assert printed.lstrip().startswith("cosine_means(top=2) on digits")
    fit_features, fit_labels = h5_arrays(cache_copy, "digits.train-fit", "features", "labels")
    [id_features] = h5_arrays(cache_copy, "digits.test", "features")
    [ood_features] = h5_arrays(cache_copy, "digits.ood", "features")
    expected = roc_auc_score(np.r_[np.ones(len(id_features)), np.zeros(len(ood_features))],
                             np.r_[cosine_reference(fit_features, fit_labels, id_features, 2),
                                   cosine_reference(fit_features, fit_labels, ood_features, 2)])
    row = next(line.split() for line in printed.splitlines() if " digits-6to9 " in line)
    assert float(row[4]) == pytest.approx(100 * expected, abs=0.006)

    code, printed, err = oodbench(capsys, "sweep", "digits", "--method", EXAMPLE, "--grid", "top=1,3",
                                  "--cache-dir", cache_copy, "--out", out, "--quiet")
    assert code == 0, err
    sweep = pd.read_csv(out / "digits/sweeps/cosine_means.csv")
    assert list(sweep["param_top"]) == [1, 3] and sweep["selected"].sum() == 1

    bench_file = tmp_path / "mine.yaml"
    bench_file.write_text((Path(methods.__file__).parents[1] / "benchmarks/digits.yaml").read_text()
                          + f"methods: [energy, {EXAMPLE}]\n")
    code, printed, err = oodbench(capsys, "run", bench_file, "--cache-dir", cache_copy, "--out", out, "--quiet")
    assert code == 0, err
    metrics = pd.read_csv(out / "digits/metrics.csv")
    assert set(metrics["method"]) == {"energy", "cosine_means"}
    near = metrics[(metrics["method"] == "cosine_means") & (metrics["ood_set"] == "digits-6to9")]
    assert near["auroc"].item() == pytest.approx(roc_auc_score(
        np.r_[np.ones(len(id_features)), np.zeros(len(ood_features))],
        np.r_[cosine_reference(fit_features, fit_labels, id_features, 1),
              cosine_reference(fit_features, fit_labels, ood_features, 1)]), abs=1e-9)


def score_files(cache: Path, name: str) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in cache.glob(f"*/scores/{name}.*.h5")}


@pytest.mark.slow
def test_editing_a_plugin_rescores_it_and_nothing_else(cache_copy, tmp_path, capsys, plugins, monkeypatch):
    body = """
    class Plugin(Method):
        name = "shifted_energy"

        def __init__(self, shift: float = 0.0):
            self.shift = shift

        def score_samples(self, split):
            return np.log(np.exp(np.asarray(split.logits, np.float64)).sum(axis=1)) + {}
    """
    reference = write_plugin(plugins, "edited_plugin", body.format("0.0"))
    argv = ("run", "digits", "--methods", f"energy,{reference}", "--cache-dir", cache_copy,
            "--out", tmp_path / "out", "--quiet")
    assert oodbench(capsys, *argv)[0] == 0
    energy, first = score_files(cache_copy, "energy"), score_files(cache_copy, "shifted_energy")
    assert len(first) == 6  # ID test, three test OOD sets, the validation OOD set, the ID validation split
    assert oodbench(capsys, *argv)[0] == 0  # unchanged: read back
    assert score_files(cache_copy, "shifted_energy") == first

    write_plugin(plugins, "edited_plugin", body.format("1.0"))  # the math changes; name and version do not
    monkeypatch.delitem(__import__("sys").modules, "edited_plugin")
    assert oodbench(capsys, *argv)[0] == 0
    after = score_files(cache_copy, "shifted_energy")
    assert len(after) == 12 and set(first) < set(after)  # new files beside the old ones
    assert score_files(cache_copy, "energy") == energy  # nothing else was re-scored
    new = sorted(set(after) - set(first))
    old = next(p for p in first if read_meta(p)["entry"] == read_meta(new[0])["entry"])
    [edited], [unedited] = h5_arrays_at(new[0], "scores"), h5_arrays_at(old, "scores")
    np.testing.assert_allclose(edited, unedited + 1.0, rtol=1e-12)


FAILURES = {
    "raises": ("def score_samples(self, split):\n        raise RuntimeError('boom')",
               "raised RuntimeError in score_samples/predict on digits-test: boom"),
    "wrong shape": ("def score_samples(self, split):\n        return np.zeros((len(split), 2))",
                    "score_samples on digits/test returned float64 of shape"),
    "NaN": ("def score_samples(self, split):\n        return np.full(len(split), np.nan)",
            "NaN or infinite scores"),
    "labels when scoring": ("reads = ('logits', 'labels')\n\n    def score_samples(self, split):\n"
                            "        return split.labels.astype(float)",
                            "read the labels of digits/test, a split it scores"),
    "undeclared read": ("def score_samples(self, split):\n        return split.features[:, 0]",
                        "read 'features' of digits/test, but its reads are ('logits',)"),
    "fit raises": ("def fit(self, split):\n        raise KeyError('oops')\n\n"
                   "    def score_samples(self, split):\n        return split.logits[:, 0]",
                   "raised KeyError in fit on digits-train"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failing_plugin_is_left_out_with_its_name_and_the_others_stand(cache_copy, tmp_path, capsys, plugins,
                                                                        failure):
    code_text, message = FAILURES[failure]
    module = f"failing_{failure.replace(' ', '_')}"
    reference = write_plugin(plugins, module, f"class Plugin(Method):\n    name = 'fragile'\n\n    {code_text}\n")
    code, printed, err = oodbench(capsys, "run", "digits", "--methods", f"energy,{reference},msp",
                                  "--cache-dir", cache_copy, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    metrics = pd.read_csv(tmp_path / "out/digits/metrics.csv")
    assert set(metrics["method"]) == {"energy", "msp"}
    [line] = [line for line in printed.splitlines() if line.startswith("left out fragile")]
    assert message in line
    if failure in ("raises", "wrong shape", "fit raises"):
        assert f"({reference})" in line  # the plugin is named by its reference


@pytest.mark.parametrize("reference, body, message", [
    ("no_such_module:Thing", None, "cannot import module 'no_such_module'"),
    ("ref_missing:Other", "class Plugin(Method):\n    name = 'x'", "module 'ref_missing' has no attribute 'Other'"),
    ("ref_not_method:Plugin", "class Plugin:\n    name = 'x'", "not a subclass of methods.Method"),
    ("ref_no_name:Plugin", "class Plugin(Method):\n    pass", "needs a class attribute name"),
    ("ref_builtin_name:Plugin", "class Plugin(Method):\n    name = 'energy'", "which the built-in"),
    ("ref_bad_reads:Plugin", "class Plugin(Method):\n    name = 'x'\n    reads = ('pixels',)",
     "reads must be a tuple drawn from"),
    ("ref_no_default:Plugin", "class Plugin(Method):\n    name = 'x'\n\n    def __init__(self, a):\n        self.a = a",
     "every constructor parameter needs a default"),
    ("ref_not_stored:Plugin", "class Plugin(Method):\n    name = 'x'\n\n    def __init__(self, a=1):\n        pass",
     "must store each parameter as an attribute of the same name"),
    ("ref_import_fails:Plugin", "raise RuntimeError('broken at import')", "raised RuntimeError: broken at import"),
])
def test_a_bad_plugin_reference_is_one_error_before_any_work(tmp_path, capsys, plugins, forwards, reference, body,
                                                            message):
    if body is not None:
        write_plugin(plugins, reference.partition(":")[0], body)
    code, _, err = oodbench(capsys, "run", "digits", "--methods", f"energy,{reference}",
                            "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out", "--quiet")
    assert code == 2
    assert err.startswith("error: method '") and reference in err and message in err and err.count("\n") == 1
    assert forwards == [] and not (tmp_path / "cache").exists()


def test_unknown_plugin_parameter_names_the_plugin(tmp_path, capsys, plugins):
    code, _, err = oodbench(capsys, "score", "digits", "--method", EXAMPLE, "--param", "k=3",
                            "--cache-dir", tmp_path / "cache", "--quiet")
    assert code == 2
    assert err.startswith("error: method 'cosine_means' has no parameter k; its parameters: top (default 1)")


def test_installed_plugins_register_by_name_through_entry_points(cache_copy, tmp_path, capsys, plugins):
    """A distribution on sys.path with an `oodbench.methods` entry point (what `pip install` of a
    package declaring one leaves in site-packages)."""
    info = plugins / "cosine_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cosine-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[oodbench.methods]\ncosine = {EXAMPLE}\n")
    assert method_class("cosine").__name__ == "CosineToClassMeans"
    code, printed, err = oodbench(capsys, "list")
    assert code == 0 and f"cosine         {EXAMPLE}" in printed
    code, printed, err = oodbench(capsys, "score", "digits", "--method", "cosine", "--cache-dir", cache_copy,
                                  "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    assert printed.lstrip().startswith("cosine_means on digits")
    code, _, err = oodbench(capsys, "score", "digits", "--method", "cosin", "--cache-dir", cache_copy, "--quiet")
    assert code == 2 and "installed plugins: cosine;" in err


# ---------------------------------------------------------------- the interface itself

class Doubled(Method):
    name = "doubled"

    def __init__(self, factor: float = 2.0):
        self.factor = factor

    def score_samples(self, split):
        return self.factor * np.asarray(split.logits, np.float64).max(axis=1)


def test_get_set_params_and_clone_follow_scikit_learn():
    method = make_method(Doubled, factor="3")
    assert method.get_params() == {"factor": 3.0} and method.label() == "doubled(factor=3)"
    method.fitted_ = "state"
    assert method.set_params(factor=4) is method and method.factor == 4.0
    twin = method.clone()
    assert twin.get_params() == {"factor": 4.0} and not hasattr(twin, "fitted_")
    with pytest.raises(ValueError, match="has no parameter k"):
        method.set_params(k=1)


def test_score_is_a_deprecated_alias_and_old_plugins_still_work():
    split = type("S", (), {"logits": np.array([[1.0, 3.0], [2.0, 0.0]])})()
    with pytest.warns(DeprecationWarning, match="score_samples"):
        assert list(Doubled().score(split)) == [6.0, 4.0]
    with pytest.warns(DeprecationWarning, match="defines score"):
        class Old(Method):
            name = "old"

            def score(self, split):
                return np.asarray(split.logits).min(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(Old().score_samples(split)) == [1.0, 0.0]


def test_split_view_shows_only_what_a_method_declares():
    split = type("S", (), {"name": "toy/test", "logits": np.eye(2), "features": np.ones((2, 3)),
                           "labels": np.array([0, 1]), "__len__": lambda self: 2})()
    method = Doubled()
    view = SplitView(split, method)
    assert len(view) == 2 and view.logits is split.logits
    with pytest.raises(UndeclaredRead, match="read 'features' of toy/test, but its reads are \\('logits',\\)"):
        _ = view.features
    reader = make_method("mahalanobis")  # reads labels: at fit time only
    assert list(SplitView(split, reader, fitting=True).labels) == [0, 1]
    with pytest.raises(UndeclaredRead, match="labels are given to fit only"):
        _ = SplitView(split, reader).labels


def test_builtins_keep_their_cache_keys_and_plugins_are_keyed_by_code():
    assert make_method("energy").code_key() == ""  # built-ins: keyed by their version, as before

    def typed_in_a_repl(offset):  # no source file to read: the bytecode is the key
        namespace = {"Method": Method, "np": np}
        exec(f"class Plugin(Method):\n    name = 'p'\n    def score_samples(self, split):\n"
             f"        return split.logits[:, 0] + {offset}\n", namespace)
        return namespace["Plugin"]

    assert typed_in_a_repl(1).code_key() == typed_in_a_repl(1).code_key() != typed_in_a_repl(2).code_key()
    assert len(Doubled.code_key()) == 16


@pytest.mark.slow
def test_the_console_script_finds_a_plugin_in_the_current_folder_and_its_workers_too(cache_copy, tmp_path):
    """`oodbench` (a console script: the current folder is not on its path) run from the plugin's
    folder, with the scoring grid in two worker processes that import the plugin again."""
    import subprocess
    import sys

    script = Path(sys.executable).with_name("oodbench")
    result = subprocess.run([str(script), "run", "digits", "--methods", f"msp,{EXAMPLE}", "--jobs", "2",
                             "--cache-dir", str(cache_copy), "--out", str(tmp_path / "out"), "--quiet"],
                            cwd=EXAMPLES, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = pd.read_csv(tmp_path / "out/digits/metrics.csv")
    assert set(metrics["method"]) == {"msp", "cosine_means"}


NETWORK_PLUGIN = """
import numpy as np

from methods.logit_scores import energy
from methods.network_scores import NetworkMethod


class Plugin(NetworkMethod):
    \"\"\"Energy of the logits of the horizontally flipped image (a test-time augmentation).\"\"\"

    name = "flipped_energy"

    def __init__(self, T: float = 1.0):
        self.T = T

    def network_outputs(self, network, rows):
        flipped = np.ascontiguousarray(rows.images[:, :, ::-1])
        return network.shaped_outputs(flipped, "penultimate", lambda features: features{shift})

    def network_key(self, declared=None):
        key = super().network_key(declared)
        del key["T"]  # the pass does not depend on the temperature: a sweep over T reuses it
        return key

    def score_samples(self, split):
        return energy(np.asarray(self.derived(split).logits, np.float64), self.T)
"""


@pytest.mark.slow
def test_a_network_plugin_uses_the_derived_entries_like_the_builtins(cache_copy, tmp_path, capsys, plugins,
                                                                     forwards, monkeypatch):
    import sys

    import torch
    from scipy.special import logsumexp

    from extract.backbones import digits_net
    from extract.datasets import load_dataset

    (plugins / "flip_plugin.py").write_text(NETWORK_PLUGIN.format(shift=""))
    argv = ("score", "digits", "--method", "flip_plugin:Plugin", "--cache-dir", cache_copy, "--out", tmp_path / "out",
            "--quiet")
    code, printed, err = oodbench(capsys, *argv)
    assert code == 0, err
    assert forwards  # its own pass ran through the network...
    derived = sorted(cache_copy.glob("*/derived/*.flipped_energy.*.h5"))
    assert len(derived) == 6  # ID test, three test OOD sets, the validation OOD set, the ID validation split
    # ...and its numbers are those of the flipped images through the trained network, by hand
    [weights] = cache_copy.glob("weights/*.pt")
    model = digits_net()
    model.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
    test = load_dataset("digits", "test")
    x = (torch.from_numpy(np.ascontiguousarray(test.images[:, :, ::-1])).unsqueeze(1) - 0.3) / 0.4  # in [0, 1]
    with torch.no_grad():
        by_hand = logsumexp(model.eval()(x).double().numpy(), axis=1)
    [test_entry] = [p for p in derived if p.name.startswith("digits.test.")]
    [scores] = [p for p in cache_copy.glob("*/scores/flipped_energy.*.h5") if read_meta(p)["entry"] ==
                read_meta(test_entry)["data_key"]]
    np.testing.assert_allclose(h5_arrays_at(scores, "scores")[0], by_hand, rtol=1e-5)

    forwards.clear()  # a sweep over its score's parameter reads the derived entries: no network
    code, _, err = oodbench(capsys, "sweep", "digits", "--method", "flip_plugin:Plugin", "--grid", "T=1,2",
                            "--cache-dir", cache_copy, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    assert forwards == []

    (plugins / "flip_plugin.py").write_text(NETWORK_PLUGIN.format(shift=" * 2"))  # another pass
    monkeypatch.delitem(sys.modules, "flip_plugin")
    assert oodbench(capsys, *argv)[0] == 0
    assert forwards and len(list(cache_copy.glob("*/derived/*.flipped_energy.*.h5"))) == 12
