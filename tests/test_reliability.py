"""Hostile but realistic use of the command line: damaged weights and checkpoints, bad options and
factories, interruptions and bugs each end in one clear line and a known exit code, and the
cache verifies clean afterwards (issue 15). Faults of the disk and the cache's own files are in
tests/test_store_faults.py; bad benchmark files in tests/test_config_validation.py.
"""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import harness.cli
import harness.evaluation
from extract.backbones import DigitsNet
from extract.training import cached_weights
from extract.weights import load_checked, save_checked
from harness.cli import build_parser, main
from tests.conftest import oodbench, remount_read_only
from tests.test_pipeline import user_model_benchmark

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def verifies_clean(capsys, cache: Path) -> bool:
    code, out, _ = oodbench(capsys, "cache", "verify", "--cache-dir", cache)
    return code == 0 and "0 corrupt" in out


def one_error_line(err: str) -> str:
    """The stderr of a failed command: exactly one ``error:`` line and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


# ---------------------------------------------------------------- trained weights are checksummed

def flip_bytes_in_the_middle(path: Path, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


@pytest.mark.slow
def test_damaged_trained_weights_are_moved_aside_and_retrained(warm, cache_copy, tmp_path, capsys, caplog):
    """Flipping 16 bytes in the middle of the trained weights gave a new backbone (ID accuracy 16.8%)
    and a leaderboard of wrong numbers under the old accuracy."""
    [weights] = cache_copy.glob("weights/digits-net-seed0-*.pt")
    flip_bytes_in_the_middle(weights)
    code, out, err = oodbench(capsys, "run", "digits", "--cache-dir", cache_copy, "--out", tmp_path / "out",
                              "--quiet")
    assert code == 0, err
    assert "moved it to" in caplog.text and "computing it again" in caplog.text
    assert weights.with_name(weights.name + ".corrupt").exists()
    load_checked(weights)  # retrained, sound
    # the same weights again (training is seeded), so the very same numbers as the undamaged run
    fresh = pd.read_csv(tmp_path / "out" / "digits" / "metrics.csv")
    pd.testing.assert_frame_equal(fresh, pd.read_csv(warm.out / "digits" / "metrics.csv"))
    line = next(line for line in out.splitlines() if line.startswith("backbone digits-net seed 0"))
    assert line in warm.stdout  # the summary's accuracy is the retrained run's, the same as before
    assert verifies_clean(capsys, cache_copy)


@pytest.mark.parametrize("damage", [flip_bytes_in_the_middle, truncate, lambda path: path.write_bytes(b"")])
def test_damaged_weights_files_are_moved_aside(warm, tmp_path, caplog, damage):
    """A truncated weights file gave an OSError traceback and never recovered."""
    [weights] = warm.cache.glob("weights/digits-net-seed0-*.pt")
    copy = tmp_path / weights.name
    copy.write_bytes(weights.read_bytes())
    assert cached_weights(copy) is not None
    damage(copy)
    assert cached_weights(copy) is None  # so it is trained again
    assert not copy.exists() and copy.with_name(copy.name + ".corrupt").exists()
    assert f"weights file {copy}" in caplog.text and "moved it to" in caplog.text


def test_damaged_weights_are_not_retrained_by_score(warm, cache_copy, tmp_path, capsys, forwards):
    """``score_samples`` never trains: damaged weights are moved aside and it says what to run."""
    [weights] = cache_copy.glob("weights/digits-net-seed0-*.pt")
    flip_bytes_in_the_middle(weights)
    code, _, err = oodbench(capsys, "score", "digits", "--method", "energy", "--cache-dir", cache_copy,
                            "--out", tmp_path / "out", "--quiet")
    assert code == 2
    assert "has not been trained" in one_error_line(err) and "oodbench extract digits" in err
    assert forwards == []
    assert verifies_clean(capsys, cache_copy)


def test_weights_files_carry_a_checksum_of_every_value(tmp_path):
    path = tmp_path / "w.pt"
    contents = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "record": {"history": [{"acc": 0.5}]}}
    save_checked(contents, path)
    loaded = load_checked(path)
    assert (torch.equal(loaded["state_dict"]["w"], contents["state_dict"]["w"])
            and loaded["record"] == contents["record"])
    plain = torch.load(path, weights_only=True)  # still a plain torch file
    assert set(plain) == {"state_dict", "record", "format", "checksum"}
    for edit in (lambda s: s["state_dict"]["w"].__setitem__((0, 0), 1e-30),
                 lambda s: s["record"]["history"][0].__setitem__("acc", 0.97)):
        edited = torch.load(path, weights_only=True)
        edit(edited)
        torch.save(edited, tmp_path / "edited.pt")
        with pytest.raises(harness.cli.CacheCorrupt, match="does not match its checksum"):
            load_checked(tmp_path / "edited.pt")
    torch.save(contents, tmp_path / "old.pt")
    with pytest.raises(harness.cli.CacheCorrupt, match="has no checksum"):
        load_checked(tmp_path / "old.pt")


def test_cache_verify_checks_weights_files(cache_copy, capsys):
    assert verifies_clean(capsys, cache_copy)
    [weights] = cache_copy.glob("weights/digits-net-seed0-*.pt")
    flip_bytes_in_the_middle(weights)
    code, out, _ = oodbench(capsys, "cache", "verify", "--cache-dir", cache_copy)
    assert code == 1 and f"CORRUPT {weights}" in out


def test_cache_verify_lists_temporaries_of_killed_writes_and_rm_stale_removes_them(cache_copy, capsys):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    [entry] = cache_copy.glob("*/digits.test.*.h5")
    leftover = entry.with_name(f".{entry.name}.tmp-{finished.stdout.strip()}-0123abcd")  # its writer is gone
    leftover.write_bytes(b"half an entry")
    code, out, _ = oodbench(capsys, "cache", "verify", "--cache-dir", cache_copy)
    assert code == 0  # nothing under a final name is corrupt
    assert f"temporary {leftover} (13 bytes, for {entry.name}; writer pid" in out and "gone)" in out
    assert out.strip().endswith("1 temporary files, 1 of them left by killed writes; remove those with "
                                "`oodbench cache rm --stale`")
    code, out, _ = oodbench(capsys, "cache", "rm", "--stale", "--cache-dir", cache_copy)
    assert code == 0 and "removed 1 temporary files of killed writes" in out
    assert not leftover.exists() and entry.exists()
    code, out, _ = oodbench(capsys, "cache", "verify", "--cache-dir", cache_copy)
    assert "temporary" not in out and out.strip().endswith("0 corrupt")


# ---------------------------------------------------------------- a full disk, a read-only cache (CLI)

def cache_on_tmpfs(tmpfs, warm, size: str) -> Path:
    """A copy of the warm digits cache on a tmpfs of ``size``."""
    return Path(shutil.copytree(warm.cache, tmpfs(size) / "cache"))


def fill_up(folder: Path, leave: int) -> None:
    """Fill the file system of ``folder`` until about ``leave`` bytes are free."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


def score_table(out: str) -> str:
    return out.split("\ntime:")[0]


def test_score_on_a_full_disk_is_one_error_naming_the_space(warm, tmpfs, tmp_path, capsys):
    cache = cache_on_tmpfs(tmpfs, warm, "64m")
    fill_up(cache, leave=100_000)
    code, _, err = oodbench(capsys, "score", "digits", "--method", "energy", "--param", "T=3", "--cache-dir", cache,
                            "--out", tmp_path / "out", "--quiet")
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"error: cannot write to {cache}/") and "no space left on device (needs about" in line
    assert "kB free); free some space or point --cache-dir elsewhere" in line
    (cache / "filler").unlink()
    assert verifies_clean(capsys, cache) and not list(cache.rglob(".*.tmp-*"))


@pytest.mark.slow
def test_run_on_a_full_disk_is_one_error_and_leaves_nothing_half_written(warm, tmpfs, tmp_path, capsys):
    """``run`` extracting onto a full tmpfs ended in h5py's RuntimeError and a segmentation fault."""
    cache = cache_on_tmpfs(tmpfs, warm, "64m")
    [entry] = cache.glob("*/digits.test.*.h5")
    entry.unlink()  # to be extracted again
    fill_up(cache, leave=50_000)
    code, _, err = oodbench(capsys, "run", "digits", "--cache-dir", cache, "--out", tmp_path / "out", "--quiet")
    assert code == 2
    assert "no space left on device (needs about" in one_error_line(err)
    (cache / "filler").unlink()
    assert not entry.exists() and not list(cache.rglob(".*.tmp-*"))
    assert verifies_clean(capsys, cache)


@pytest.mark.slow
def test_a_read_only_cache_still_scores_without_caching(warm, tmpfs, tmp_path, capsys, caplog):
    cache = cache_on_tmpfs(tmpfs, warm, "64m")
    writable = Path(shutil.copytree(warm.cache, tmp_path / "writable"))
    remount_read_only(cache.parent)
    argv = ("score", "digits", "--method", "energy", "--param", "T=3", "--out", tmp_path / "out", "--quiet")
    code, out, err = oodbench(capsys, *argv, "--cache-dir", cache)
    assert code == 0, err
    assert "scores are not cached: cannot write to" in caplog.text and "read-only file system" in caplog.text
    code, expected, _ = oodbench(capsys, *argv, "--cache-dir", writable)
    assert code == 0 and score_table(out) == score_table(expected)  # the same numbers, only not cached
    assert verifies_clean(capsys, cache)


def test_a_read_only_cache_stops_what_must_write_before_any_work(warm, tmpfs, tmp_path, capsys, forwards):
    cache = cache_on_tmpfs(tmpfs, warm, "64m")
    remount_read_only(cache.parent)
    code, _, err = oodbench(capsys, "run", "digits", "--seeds", "1", "--cache-dir", cache, "--out", tmp_path / "out",
                            "--quiet")  # seed 1 is not trained yet
    assert code == 2
    assert "it is on a read-only file system; remount it read-write or point --cache-dir elsewhere" in \
        one_error_line(err)
    assert forwards == []  # no training step ran
    assert verifies_clean(capsys, cache)


# ---------------------------------------------------------------- user checkpoints and factories

class RunsACommand:
    """A pickle whose payload calls os.system (here: creating a marker file) when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def valid_checkpoint_bytes(tmp_path) -> bytes:
    torch.save(DigitsNet(num_classes=6).state_dict(), tmp_path / "valid.pt")
    return (tmp_path / "valid.pt").read_bytes()


@pytest.mark.parametrize("content, expected", [
    ("random", "it is not a PyTorch file of tensors, or is truncated"),
    ("truncated", "it is not a PyTorch file of tensors, or is truncated"),
    ("empty", "is empty (0 bytes)"),
    ("malicious", "holds Python objects other than tensors (Trying to load unsupported GLOBAL posix.system"),
    ("list", "does not hold a state dict of tensors"),
])
def test_checkpoints_that_are_not_checkpoints(tmp_path, monkeypatch, capsys, content, expected):
    bench = user_model_benchmark(tmp_path, monkeypatch, f"oodbench_test_ckpt_{content}", {})
    checkpoint = tmp_path / f"oodbench_test_ckpt_{content}.pt"
    marker = tmp_path / "pwned"
    if content == "random":
        checkpoint.write_bytes(np.random.default_rng(0).bytes(4096))
    elif content == "truncated":
        checkpoint.write_bytes(valid_checkpoint_bytes(tmp_path)[:3000])
    elif content == "empty":
        checkpoint.write_bytes(b"")
    elif content == "malicious":
        checkpoint.write_bytes(pickle.dumps({"state_dict": RunsACommand(marker)}, protocol=2))
    else:
        torch.save([torch.zeros(1)], checkpoint)
    cache = tmp_path / "cache"
    code, _, err = oodbench(capsys, "run", bench, "--cache-dir", cache, "--out", tmp_path / "out", "--quiet")
    assert code == 2
    line = one_error_line(err)
    assert f"checkpoint {checkpoint}" in line and expected in line
    assert not marker.exists()  # the payload never ran
    assert verifies_clean(capsys, cache)


def test_a_missing_checkpoint_says_it_does_not_exist(tmp_path, monkeypatch, capsys):
    bench = user_model_benchmark(tmp_path, monkeypatch, "oodbench_test_absent", {})
    checkpoint = tmp_path / "oodbench_test_absent.pt"
    checkpoint.unlink()
    code, _, err = oodbench(capsys, "run", bench, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out")
    assert code == 2
    assert one_error_line(err) == f"error: backbone user-net: checkpoint {checkpoint} does not exist"


FACTORIES = {
    "raises": ("def build(num_classes=6):\n    raise RuntimeError('no GPU for this model')\n",
               "factory 'oodbench_test_factory_raises:build' raised RuntimeError when called with kwargs {}: "
               "no GPU for this model"),
    "not_callable": ("build = 42\n", "factory 'oodbench_test_factory_not_callable:build' is a int, not a "
                                     "function or class that builds the model"),
    "not_a_module": ("def build(num_classes=6):\n    return {'fc': None}\n",
                     "factory 'oodbench_test_factory_not_a_module:build' returned a dict, not a torch.nn.Module"),
    "import_fails": ("raise ZeroDivisionError('at import')\n",
                     "cannot import module 'oodbench_test_factory_import_fails' for factory "
                     "'oodbench_test_factory_import_fails:build': ZeroDivisionError: at import"),
}


@pytest.mark.parametrize("kind", FACTORIES)
def test_user_factories_that_fail(tmp_path, monkeypatch, capsys, kind):
    module = f"oodbench_test_factory_{kind}"
    bench = user_model_benchmark(tmp_path, monkeypatch, module, DigitsNet(num_classes=6).state_dict())
    source, expected = FACTORIES[kind]
    (tmp_path / f"{module}.py").write_text(source)
    code, _, err = oodbench(capsys, "run", bench, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out",
                            "--quiet")
    assert code == 2
    assert expected in one_error_line(err)


# ---------------------------------------------------------------- options checked when parsed

@pytest.mark.parametrize("argv, expected", [
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", "99999999999999999999"], "--seeds"),
    (["--seeds", "0,0"], "--seeds"),
    (["--seeds", "a"], "--seeds takes comma-separated integers"),
    (["--workers", "-5"], "--workers takes a number of processes >= 0"),
    (["--workers", "many"], "--workers takes a number of processes >= 0"),
    (["--device", "bogus"], "--device takes auto, cpu, cuda, cuda:N or mps, got 'bogus'"),
])
def test_bad_options_are_refused_when_parsed(tmp_path, capsys, argv, expected):
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as info:
        main(["score", "digits", "--method", "energy", "--cache-dir", str(cache), *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not cache.exists()  # nothing started, no lock file left behind


@pytest.mark.parametrize("option", ["--cache-dir", "--out"])
@pytest.mark.parametrize("under", [False, True])
def test_a_folder_option_that_is_a_file(tmp_path, capsys, option, under):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    value = a_file / "sub" if under else a_file
    code, _, err = oodbench(capsys, "score", "digits", "--method", "energy", option, value, "--quiet")
    assert code == 2
    what = f"lies under {a_file}, which is a file" if under else "is a file"
    assert one_error_line(err) == f"error: {option} {value} {what}, not a folder; give a folder path"


def test_workers_and_jobs_are_capped_at_the_cpu_count(capsys, monkeypatch):
    monkeypatch.setattr(harness.cli, "usable_cpus", lambda: 2)
    args = build_parser().parse_args(["run", "digits", "--workers", "100000", "--jobs", "64"])
    assert harness.cli._bench(args).options.workers == 2
    assert harness.cli._grid(args)["jobs"] == 2
    err = capsys.readouterr().err
    assert "note: --workers 100000 is more than the 2 CPUs available; using 2" in err
    assert "note: --jobs 64 is more than the 2 CPUs available; using 2" in err
    cluster = build_parser().parse_args(["run", "digits", "--jobs", "64", "--backend", "dask",
                                         "--scheduler", "tcp://head:8786"])
    assert harness.cli._grid(cluster)["jobs"] == 64  # a cluster's workers are not this machine's


def test_global_options_before_and_after_the_command():
    parser = build_parser()
    for argv in (["--quiet", "run", "digits"], ["run", "digits", "--quiet"], ["--quiet", "run", "digits", "--quiet"]):
        assert parser.parse_args(argv).quiet
    assert not parser.parse_args(["run", "digits"]).quiet
    args = parser.parse_args(["--cache-dir", "/a", "--debug", "list"])
    assert args.cache_dir == Path("/a") and args.debug
    assert parser.parse_args(["--cache-dir", "/a", "cache", "ls", "--cache-dir", "/b"]).cache_dir == Path("/b")


def test_quiet_before_the_command_runs(cache_copy, tmp_path, capsys):
    code, out, err = oodbench(capsys, "--quiet", "--cache-dir", cache_copy, "score", "digits", "--method", "msp",
                              "--out", tmp_path / "out")
    assert code == 0, err
    assert "INFO" not in err and "msp on digits" in out


# ---------------------------------------------------------------- interruptions and bugs

def test_ctrl_c_is_one_line_and_exit_130(cache_copy, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(harness.evaluation.Evaluation, "evaluate", interrupted)
    code, _, err = oodbench(capsys, "score", "digits", "--method", "energy", "--cache-dir", cache_copy,
                            "--out", tmp_path / "out")
    assert code == 130
    assert one_error_line(err).startswith("error: interrupted: oodbench score digits stopped by Ctrl-C;")
    assert "running it again resumes" in err


def test_an_unexpected_exception_asks_for_a_bug_report(capsys, monkeypatch):
    def broken(args):
        raise TypeError("unsupported operand")
    monkeypatch.setattr(harness.cli, "cmd_list", broken)
    code, _, err = oodbench(capsys, "list")
    assert code == 1
    line = one_error_line(err)
    assert "internal error in oodbench list: TypeError: unsupported operand" in line and "--debug" in line
    code, _, err = oodbench(capsys, "list", "--debug")
    assert code == 1 and "Traceback" in err and 'raise TypeError("unsupported operand")' in err


def children_of(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_data_loader_workers_die_with_their_run(tmp_path):
    """--workers processes of a killed run used to live on (holding the entry lock they inherited)."""
    from PIL import Image

    for i in range(8):
        Image.new("L", (8, 8), color=i).save(tmp_path / f"{i}.png")
    program = (
        "import sys, time, torch\n"
        "from extract.backbones import Preprocessing\n"
        "from extract.datasets import ImageFiles\n"
        "from extract.extraction import input_batches\n"
        f"files = ImageFiles([r'{tmp_path}/' + f'{{i}}.png' for i in range(8)], r'{tmp_path}')\n"
        "batches = input_batches(Preprocessing(8, 1, (0.0,), (1.0,)), files, 2, torch.device('cpu'), workers=2)\n"
        "next(batches)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", program], cwd=PACKAGE_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        workers = children_of(process.pid)
        assert len(workers) >= 2
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        # at once: torch's own watchdog would notice the dead parent only at its next 5-second check
        deadline = time.monotonic() + 2
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers)
    finally:
        process.kill()


@pytest.mark.slow
def test_ctrl_c_during_training_prints_one_line(tmp_path):
    """A real SIGINT while ``oodbench run digits`` trains: one line and exit 130, with the state that
    the next run resumes from (resuming itself: tests/test_training.py) kept and sound."""
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "harness", "run", "digits", "--cache-dir", str(cache), "--out", str(tmp_path / "out")]
    # SIGINT as a terminal gives it: a suite started in the background (`make test &` in a shell
    # without job control) runs with SIGINT ignored, children inherit that, and Python then
    # installs no KeyboardInterrupt handler
    process = subprocess.Popen(argv, cwd=PACKAGE_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(cache.glob("weights/*.resume.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert one_error_line(err).startswith("error: interrupted: oodbench run digits stopped by Ctrl-C;")
    [resume] = cache.glob("weights/*.resume.pt")
    assert load_checked(resume)["epoch"] >= 1
