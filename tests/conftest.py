"""Shared test fixtures: the development data folder, env isolation, a warm digits run, helpers,
the batch-independence assertion and small or read-only file systems (tmpfs mounts)."""
import io
import os
import shutil
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.cli import main

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n``), each worker gets its share of the cores for
    torch and the BLAS, so that N workers do not start N x cores threads on a small machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        from threadpoolctl import threadpool_limits

        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        threadpool_limits(threads)


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when the folder is absent (a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"development data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """Keep tests away from the user's data root, download folder and cache."""
    monkeypatch.delenv("OODBENCH_DATA_ROOT", raising=False)
    monkeypatch.delenv("OODBENCH_CACHE_DIR", raising=False)
    monkeypatch.setenv("OODBENCH_DOWNLOAD_DIR", str(tmp_path_factory.mktemp("downloads")))


# ---------------------------------------------------------------- one warm `oodbench run digits` per session

@dataclass
class WarmRun:
    root: Path
    cache: Path
    out: Path
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def warm(tmp_path_factory) -> WarmRun:
    """`oodbench run digits` once per session; tests that mutate the cache use ``cache_copy``."""
    root = tmp_path_factory.mktemp("oodbench-digits-warm")
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:  # the autouse env isolation is function-scoped
        mp.delenv("OODBENCH_DATA_ROOT", raising=False)
        mp.delenv("OODBENCH_CACHE_DIR", raising=False)
        mp.setenv("OODBENCH_DOWNLOAD_DIR", str(root / "downloads"))
        with redirect_stdout(stdout), redirect_stderr(stderr):
            code = main(["run", "digits", "--cache-dir", str(root / "cache"), "--out", str(root / "out"), "--quiet"])
    run = WarmRun(root, root / "cache", root / "out", code, stdout.getvalue(), stderr.getvalue())
    assert run.code == 0, run.stderr
    return run


@pytest.fixture
def cache_copy(warm, tmp_path) -> Path:
    return Path(shutil.copytree(warm.cache, tmp_path / "cache"))


@pytest.fixture
def forwards():
    """Names of every nn.Module whose forward ran during the test (global hook)."""
    calls: list[str] = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: calls.append(type(module).__name__))
    yield calls
    handle.remove()


def oodbench(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr) of that call only."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def only_a_record_was_added(cache: Path, before: list[str]) -> bool:
    """Nothing was computed: the one new file is the record of the resolution (harness.resolution)
    that a command writes when it resolves in full (here: the test's own download folder is a new key)."""
    [added] = [f for f in files(cache) if f not in before]
    return added.startswith("runs/digits.")


# ---------------------------------------------------------------- batch independence of scores (methods.base)

BATCH_RTOL = 1e-12  # the contract: a score agrees with its whole-split value to 1e-12 relative


def assert_batch_invariant(whole, pieces) -> None:
    """Scores of one split computed two ways - ``whole`` in one call, ``pieces`` in another batching
    (shuffled, reversed, cut, other thread counts), an array or a list of arrays to concatenate,
    back in the order of ``whole`` - meet the batch-independence contract of ``methods.base``:

    - every score equals its ``whole`` value to ``BATCH_RTOL`` relative, with an absolute floor of
      ``BATCH_RTOL`` times the split's largest |score|: a score near 0 is a difference of terms about
      as large as the split's scores (e.g. KNN's ||a||^2 + ||b||^2 - 2 a.b), and keeps their rounding;
    - ranks are identical once near-ties are merged: sorted ``whole`` scores within
      ``4 * floor`` of their neighbour (more than the two sides' allowed errors together) form one
      tie group, and every score is replaced by the lowest score of its group, in both arrays.
      Between groups this is a strict statement that rounding cannot break; within a group the order
      is rounding (identical input rows can score exactly equal in one batching and an ulp apart in
      another), so it is not compared;
    - ``results.metrics.ood_metrics`` of those merged scores as ID against fixed reference OOD
      scores, one between every two groups and one beyond each end, are identical (both conventions,
      both FPR rules).
    """
    from scipy.stats import rankdata

    from results.metrics import ood_metrics

    whole = np.asarray(whole)
    pieces = np.concatenate(pieces) if isinstance(pieces, (list, tuple)) else np.asarray(pieces)
    assert whole.dtype == pieces.dtype == np.float64 and whole.ndim == 1 and pieces.shape == whole.shape
    floor = BATCH_RTOL * np.abs(whole).max(initial=0.0)
    np.testing.assert_allclose(pieces, whole, rtol=BATCH_RTOL, atol=floor)

    order = np.argsort(whole, kind="stable")
    ordered = whole[order]
    new_group = np.diff(ordered) > 4 * floor
    group = np.empty(len(whole), dtype=np.int64)
    group[order] = np.concatenate([[0], np.cumsum(new_group)])

    def merged(scores):
        lowest = np.full(group.max(initial=-1) + 1, np.inf)
        np.minimum.at(lowest, group, scores)
        return lowest[group]

    whole_merged, pieces_merged = merged(whole), merged(pieces)
    np.testing.assert_array_equal(rankdata(pieces_merged), rankdata(whole_merged))
    if len(whole):
        low, high = ordered[0], ordered[-1]
        between = (ordered[:-1][new_group] + ordered[1:][new_group]) / 2
        reference = np.concatenate([[low - 1 - abs(low)], between, [high + 1 + abs(high)]])
        for convention, rule in (("id_positive", "canonical"), ("ood_positive", "canonical"),
                                 ("id_positive", "cal_metric")):
            assert (ood_metrics(pieces_merged, reference, convention, rule)
                    == ood_metrics(whole_merged, reference, convention, rule)), (convention, rule)


# ---------------------------------------------------------------- real file systems: tmpfs mounts

def _mount(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def tmpfs(tmp_path):
    """``make(size)``: a fresh tmpfs of ``size`` (e.g. '4m') mounted under tmp_path; unmounted after."""
    mounted = []

    def make(size: str) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        try:
            done = _mount("-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(point))
        except FileNotFoundError:
            pytest.skip("no mount command: cannot make a small or read-only file system")
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield make
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def remount_read_only(point: Path) -> None:
    done = _mount("-o", "remount,ro", str(point))
    if done.returncode:
        pytest.skip(f"cannot remount {point} read-only: {done.stderr.strip()}")
