"""Shared test fixtures: the development data folder, env isolation, a warm digits run, helpers."""
import io
import shutil
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from harness.cli import main

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
