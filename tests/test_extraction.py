"""Tests for extract.extraction: cached arrays against the model itself, caching, content keys,
kill-and-resume, damaged chunks and files, concurrent writers, and argument errors.

Everything runs the tiny registry network ``digits-net`` (randomly initialised, seeded) on
scikit-learn's bundled 8x8 digits, so no files or training are needed.
"""
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import extract.extraction as extraction
from extract.backbones import DigitsNet, get_backbone_spec, registered_backbone
from extract.datasets import ImageSet, load_dataset
from extract.extraction import entry_data_key, extract, resolve_device
from extract.store import FeatureStore, read_verified, verify_file

SPEC = get_backbone_spec("digits-net")
LAYERS = ("block1", "block2")


def randomise_batch_norm(model: nn.Module) -> nn.Module:
    """Give every BatchNorm2d of ``model`` non-trivial statistics and affine parameters (from torch's
    current seed), so a test sees more than the identity normalisation of a fresh model."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def random_state(seed: int) -> dict[str, torch.Tensor]:
    """A DigitsNet state dict with seeded weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = randomise_batch_norm(DigitsNet(num_classes=6))
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def make_backbone(state):
    return registered_backbone(SPEC, state, "digits-net", 6)


def subset(images: ImageSet, n: int) -> ImageSet:
    return ImageSet(images.name, images.split, images.images[:n].copy(), images.labels[:n].copy(),
                    images.source, images.classes)


def entry_path(store, backbone, images, layers=(), activations_dtype="float32") -> Path:
    return store.entry_path(backbone.key, images.name, images.split,
                            entry_data_key(backbone, images, tuple(layers), activations_dtype))


def reference(backbone, images) -> dict[str, np.ndarray]:
    """The model run by hand on the whole set at once: preprocessing written out, eval mode."""
    model = backbone.model.eval()
    x = torch.from_numpy((images.images.astype(np.float32) - 0.3) / 0.4).unsqueeze(1)  # digits-net: mean .3, std .4
    with torch.no_grad():
        block1 = model.block1(x)
        block2 = model.block2(block1)
        return {"x": x.numpy(), "logits": model(x).numpy(), "features": model.pool(block2).numpy(),
                "block1": block1.numpy(), "block2": block2.numpy()}


def arrays_of(entry, layers=()) -> dict[str, np.ndarray]:
    out = {"logits": entry.logits, "features": entry.features, "labels": entry.labels}
    out.update({f"activations/{layer}": entry.activations(layer) for layer in layers})
    return out


def assert_same_arrays(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def state():
    return random_state(0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")  # 541 images of the classes 0-5


@pytest.fixture
def single_thread():
    """One torch thread, as in the forked children (whose OpenMP pool must not be used after fork),
    so the parent's arrays can be compared with theirs bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_forwards(forwards) -> int:
    """Top-level forward passes (batches) recorded by conftest's ``forwards`` fixture."""
    return forwards.count("DigitsNet")


def keep_partial(monkeypatch):
    """Make the final write fail, so an extraction leaves its complete set of chunks in .partial/."""
    def fail(*args, **kwargs):
        raise RuntimeError("final write disabled by the test")
    monkeypatch.setattr(extraction, "write_h5_atomic", fail)


# ---------------------------------------------------------------- values

def test_cached_arrays_equal_the_model(tmp_path, state, digits):
    backbone = make_backbone(state)
    images = subset(digits, 100)
    store = FeatureStore(tmp_path)
    entry = extract(backbone, images, store, layers=LAYERS, batch_size=32, chunk_batches=2, progress=False)
    ref = reference(backbone, images)
    np.testing.assert_allclose(backbone.preprocessing(images.images).numpy(), ref["x"], rtol=0, atol=1e-6)

    assert entry.path == entry_path(store, backbone, images, LAYERS)
    assert entry.logits.dtype == np.float32 and entry.logits.shape == (100, 6)
    assert entry.features.dtype == np.float32 and entry.features.shape == (100, 32)
    np.testing.assert_allclose(entry.logits, ref["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entry.features, ref["features"], rtol=1e-5, atol=1e-5)
    assert entry.labels.dtype == np.int64
    np.testing.assert_array_equal(entry.labels, images.labels)
    for layer in LAYERS:
        got = entry.activations(layer)
        assert got.dtype == np.float32 and got.shape == ref[layer].shape
        np.testing.assert_allclose(got, ref[layer], rtol=1e-5, atol=1e-5)

    W, b = entry.head
    np.testing.assert_array_equal(W, backbone.model.fc.weight.detach().numpy())
    np.testing.assert_array_equal(b, backbone.model.fc.bias.detach().numpy())
    head = store.head_path(backbone.key)
    np.testing.assert_array_equal(read_verified(head, "W"), W)
    np.testing.assert_array_equal(read_verified(head, "b"), b)
    np.testing.assert_allclose(entry.logits, entry.features @ W.T + b, rtol=0, atol=1e-5)
    assert (entry.features >= 0).all()  # pooled ReLU outputs

    meta = entry.meta
    assert (meta["kind"], meta["dataset"], meta["split"], meta["n"]) == ("features", "digits", "train", 100)
    assert meta["layers"] == list(LAYERS) and meta["num_classes"] == 6 and meta["feature_dim"] == 32
    assert meta["fingerprint"] == images.fingerprint() and meta["backbone"]["key"] == backbone.key
    assert entry.name == "digits/train" and len(entry) == 100
    assert verify_file(entry.path) == [] and verify_file(head) == []
    assert not entry.path.with_name(entry.path.name + ".partial").exists()
    assert store.files() == sorted([entry.path, head])


def test_float16_activations(tmp_path, state, digits):
    backbone = make_backbone(state)
    images = subset(digits, 40)
    entry = extract(backbone, images, FeatureStore(tmp_path), layers=("block2",), activations_dtype="float16",
                    batch_size=16, progress=False)
    got = entry.activations("block2")
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), reference(backbone, images)["block2"], rtol=2e-3, atol=2e-3)
    assert entry.logits.dtype == np.float32  # only activations are narrowed


def test_batch_size_does_not_change_the_arrays(tmp_path, state, digits):
    backbone = make_backbone(state)
    images = subset(digits, 150)
    small = extract(backbone, images, FeatureStore(tmp_path / "a"), layers=("block1",), batch_size=7,
                    chunk_batches=3, progress=False)
    large = extract(backbone, images, FeatureStore(tmp_path / "b"), layers=("block1",), batch_size=64,
                    progress=False)
    assert small.path.relative_to(tmp_path / "a") == large.path.relative_to(tmp_path / "b")  # batch size is no key
    for name in ("logits", "features"):
        np.testing.assert_allclose(getattr(small, name), getattr(large, name), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(small.activations("block1"), large.activations("block1"), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(small.labels, large.labels)


def test_second_call_is_served_from_the_cache(tmp_path, state, digits, forwards):
    backbone = make_backbone(state)
    images = subset(digits, 50)
    store = FeatureStore(tmp_path)
    first = extract(backbone, images, store, layers=LAYERS, batch_size=16, progress=False)
    assert model_forwards(forwards) == 4  # ceil(50 / 16) batches
    stamp = first.path.stat().st_mtime_ns, first.path.stat().st_ino
    head_stamp = store.head_path(backbone.key).stat().st_mtime_ns
    forwards.clear()
    second = extract(make_backbone(state), subset(digits, 50), store, layers=LAYERS, batch_size=16,
                     progress=False)
    assert forwards == []  # no module ran at all
    assert second.path == first.path
    assert (second.path.stat().st_mtime_ns, second.path.stat().st_ino) == stamp
    assert store.head_path(backbone.key).stat().st_mtime_ns == head_stamp
    assert_same_arrays(arrays_of(second, LAYERS), arrays_of(first, LAYERS))


# ---------------------------------------------------------------- content keys

def test_content_keys(tmp_path, state, digits):
    store = FeatureStore(tmp_path)
    backbone = make_backbone(state)
    images = subset(digits, 30)
    base = entry_path(store, backbone, images, LAYERS)

    # the same weights and the same data, in fresh objects: the same file
    assert entry_path(store, make_backbone({k: v.clone() for k, v in state.items()}), subset(digits, 30),
                      LAYERS) == base

    changed_weight = {k: v.clone() for k, v in state.items()}
    changed_weight["fc.bias"][0] += 1e-3
    changed_buffer = {k: v.clone() for k, v in state.items()}
    changed_buffer["block1.1.running_mean"][0] += 1e-3
    pixel = subset(digits, 30)
    pixel.images[3, 4, 4] += 1 / 16
    label = subset(digits, 30)
    label.labels[0] = (label.labels[0] + 1) % 6
    others = {
        "weight": entry_path(store, make_backbone(changed_weight), images, LAYERS),
        "bn buffer": entry_path(store, make_backbone(changed_buffer), images, LAYERS),
        "pixel": entry_path(store, backbone, pixel, LAYERS),
        "label": entry_path(store, backbone, label, LAYERS),
        "fewer layers": entry_path(store, backbone, images, ("block1",)),
        "no layers": entry_path(store, backbone, images, ()),
        "float16": entry_path(store, backbone, images, LAYERS, "float16"),
        "other rows": entry_path(store, backbone, subset(digits, 31), LAYERS),
    }
    assert len({base, *others.values()}) == len(others) + 1, others
    assert others["weight"].parent != base.parent  # another backbone entry: another folder
    assert others["pixel"].parent == base.parent

    # extract itself writes where the keys say, and a one-pixel change is a second file
    first = extract(backbone, images, store, layers=LAYERS, batch_size=64, progress=False)
    second = extract(backbone, pixel, store, layers=LAYERS, batch_size=64, progress=False)
    assert (first.path, second.path) == (base, others["pixel"])
    assert first.path.exists() and second.path.exists()
    changed = np.flatnonzero(np.any(first.logits != second.logits, axis=1))
    assert changed.tolist() == [3]  # only the changed image's row differs


# ---------------------------------------------------------------- kill and resume

def _extract_in_child(root, images, state, kwargs, delay, record, stall_after=None):
    """Child process body (fork): extract with a model slowed by ``delay`` seconds a batch (and stuck
    for good from batch ``stall_after`` on); append one line per batch to ``record``."""
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
    backbone = make_backbone(state)
    started = []

    def slow(module, args):
        started.append(1)
        time.sleep(600 if stall_after is not None and len(started) > stall_after else delay)

    backbone.model.register_forward_pre_hook(slow)
    if record:
        def note(module, args, output):
            with open(record, "a") as handle:
                handle.write(f"{os.getpid()}\n")
        backbone.model.register_forward_hook(note)
    entry = extract(backbone, images, FeatureStore(root), progress=False, **kwargs)
    if record:
        with open(f"{record}.{os.getpid()}.done", "w") as handle:
            handle.write(str(entry.path))


def test_kill_and_resume(tmp_path, state, digits, forwards, single_thread):
    """SIGKILL mid-extraction leaves no final file; the rerun recomputes only the missing chunks
    and gives exactly the arrays of an uninterrupted run."""
    images = subset(digits, 192)  # 12 batches of 16, one per chunk
    kwargs = {"layers": ("block2",), "batch_size": 16, "chunk_batches": 1}
    store = FeatureStore(tmp_path / "killed")
    backbone = make_backbone(state)
    path = entry_path(store, backbone, images, kwargs["layers"])
    partial = path.with_name(path.name + ".partial")

    # 50 ms a batch, and batch 5 never ends: the kill always lands mid-extraction, after 4 chunks
    child = multiprocessing.get_context("fork").Process(
        target=_extract_in_child, args=(store.root, images, state, kwargs, 0.05, None, 4))
    child.start()
    deadline = time.monotonic() + 60
    try:
        while len(list(partial.glob("chunk-*.npz"))) < 4:
            assert child.is_alive(), f"the child ended early (exit code {child.exitcode})"
            assert time.monotonic() < deadline, "no chunks appeared"
            time.sleep(0.005)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    assert child.exitcode == -signal.SIGKILL
    assert not path.exists()
    done = sorted(partial.glob("chunk-*.npz"))
    assert [p.name for p in done] == [f"chunk-{i:06d}-of-000012-rows16-bs16.npz" for i in range(4)]

    forwards.clear()
    resumed = extract(backbone, images, store, progress=False, **kwargs)
    assert model_forwards(forwards) == 12 - 4  # only the missing chunks ran
    assert resumed.path == path and path.exists() and not partial.exists()
    assert verify_file(path) == []

    uninterrupted = extract(make_backbone(state), images, FeatureStore(tmp_path / "clean"), progress=False, **kwargs)
    assert_same_arrays(arrays_of(resumed, ("block2",)), arrays_of(uninterrupted, ("block2",)))
    np.testing.assert_allclose(resumed.logits, reference(backbone, images)["logits"], rtol=1e-5, atol=1e-5)


def test_damaged_chunks_are_recomputed(tmp_path, state, digits, forwards, monkeypatch):
    images = subset(digits, 80)  # 5 chunks of one batch of 16
    kwargs = {"layers": ("block1",), "batch_size": 16, "chunk_batches": 1, "progress": False}
    store = FeatureStore(tmp_path / "s")
    backbone = make_backbone(state)
    with monkeypatch.context() as patch:
        keep_partial(patch)
        with pytest.raises(RuntimeError, match="final write disabled"):
            extract(backbone, images, store, **kwargs)
    path = entry_path(store, backbone, images, ("block1",))
    chunks = sorted(path.with_name(path.name + ".partial").glob("chunk-*.npz"))
    assert len(chunks) == 5 and not path.exists()
    with open(chunks[1], "r+b") as handle:  # truncated
        handle.truncate(chunks[1].stat().st_size // 2)
    data = bytearray(chunks[3].read_bytes())  # a flipped byte inside the stored arrays (CRC-checked)
    data[len(data) // 2] ^= 0x01
    chunks[3].write_bytes(bytes(data))
    chunks[4].write_bytes(b"")  # empty

    forwards.clear()
    entry = extract(backbone, images, store, **kwargs)
    assert model_forwards(forwards) == 3
    clean = extract(make_backbone(state), images, FeatureStore(tmp_path / "clean"), **kwargs)
    assert_same_arrays(arrays_of(entry, ("block1",)), arrays_of(clean, ("block1",)))


def test_chunks_of_another_chunk_size_are_not_reused(tmp_path, state, digits, forwards, monkeypatch):
    """100 rows in batches of 16: 4 batches per chunk and 5 batches per chunk both make two chunks with the
    same file names; the rerun must not splice rows of the first run's chunks into its own."""
    images = subset(digits, 100)
    store = FeatureStore(tmp_path / "s")
    backbone = make_backbone(state)
    with monkeypatch.context() as patch:
        keep_partial(patch)
        with pytest.raises(RuntimeError):
            extract(backbone, images, store, batch_size=16, chunk_batches=4, progress=False)
    forwards.clear()
    entry = extract(backbone, images, store, batch_size=16, chunk_batches=5, progress=False)
    assert model_forwards(forwards) == 7  # both chunks recomputed (5 + 2 batches)
    assert entry.logits.shape == (100, 6) and entry.features.shape == (100, 32)
    clean = extract(make_backbone(state), images, FeatureStore(tmp_path / "clean"), batch_size=16,
                    chunk_batches=5, progress=False)
    assert_same_arrays(arrays_of(entry), arrays_of(clean))


# ---------------------------------------------------------------- concurrency and damage

def test_concurrent_writers_compute_once(tmp_path, state, digits, single_thread):
    images = subset(digits, 96)  # 6 batches of 16
    kwargs = {"batch_size": 16, "chunk_batches": 2}
    root, record = tmp_path / "cache", tmp_path / "forwards.txt"
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_extract_in_child, args=(root, images, state, kwargs, 0.05, str(record)))
                for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0]

    backbone = make_backbone(state)
    store = FeatureStore(root)
    path = entry_path(store, backbone, images)
    returned = {Path(p.read_text()) for p in tmp_path.glob("forwards.txt.*.done")}
    assert returned == {path}  # both returned the one entry
    lines = record.read_text().split()
    assert len(lines) == 6 and len(set(lines)) == 1  # six batches, all in one of the two processes
    assert store.files() == sorted([path, store.head_path(backbone.key)])
    assert not path.with_name(path.name + ".partial").exists()
    entry = store.open_entry(path)
    np.testing.assert_allclose(entry.logits, reference(backbone, images)["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(entry.labels, images.labels)


def test_corrupt_final_file_is_reextracted(tmp_path, state, digits, forwards):
    import h5py

    backbone = make_backbone(state)
    images = subset(digits, 40)
    store = FeatureStore(tmp_path)
    first = extract(backbone, images, store, layers=LAYERS, batch_size=16, progress=False)
    expected = arrays_of(first, LAYERS)
    with h5py.File(first.path, "r") as h5:
        offset = h5["features"].id.get_chunk_info(0).byte_offset
    data = bytearray(first.path.read_bytes())
    data[offset + 9] ^= 0x01
    first.path.write_bytes(bytes(data))

    forwards.clear()
    again = extract(backbone, images, store, layers=LAYERS, batch_size=16, progress=False)
    assert model_forwards(forwards) == 3  # recomputed
    assert again.path == first.path and verify_file(again.path) == []
    assert_same_arrays(arrays_of(again, LAYERS), expected)
    quarantine = first.path.with_name(first.path.name + ".corrupt")
    assert quarantine.read_bytes() == bytes(data)  # the damaged file, moved aside
    assert verify_file(quarantine)


# ---------------------------------------------------------------- errors

def test_empty_dataset_is_an_error(tmp_path, state):
    empty = ImageSet("emptyset", "test", np.zeros((0, 8, 8), np.float32), np.zeros(0, np.int64), "nowhere")
    store = FeatureStore(tmp_path)
    with pytest.raises(ValueError, match="emptyset/test"):
        extract(make_backbone(state), empty, store, progress=False)
    assert store.files() == []


def test_unknown_layer_is_an_error(tmp_path, state, digits):
    store = FeatureStore(tmp_path)
    with pytest.raises(ValueError, match=r"block3.*'block1', 'block2'"):
        extract(make_backbone(state), subset(digits, 10), store, layers=("block1", "block3"), progress=False)
    assert store.files() == []


def test_unknown_activations_dtype_is_an_error(tmp_path, state, digits):
    with pytest.raises(ValueError, match="float16"):
        extract(make_backbone(state), subset(digits, 10), FeatureStore(tmp_path), activations_dtype="int8",
                progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_an_error(tmp_path, state):
    images = load_dataset("gaussian", n=5, size=8)
    with pytest.raises(ValueError, match="--device cpu"):
        extract(make_backbone(state), images, FeatureStore(tmp_path), device="cuda", progress=False)
    assert not entry_path(FeatureStore(tmp_path), make_backbone(state), images).exists()
    with pytest.raises(ValueError, match="--device cpu"):
        resolve_device("cuda:0")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without an Apple GPU")
def test_mps_without_an_apple_gpu_is_an_error():
    with pytest.raises(ValueError, match="--device mps was asked for but torch sees no Apple GPU"):
        resolve_device("mps")


def test_chunk_files_round_trip_any_layer_name(tmp_path):
    from extract.extraction import _load_chunk, _save_chunk

    names = ("logits", "features", "layer__with__underscores", "file")
    chunk = {name: np.full((3, 2), i, dtype=np.float32) for i, name in enumerate(names)}
    path = tmp_path / "chunk.npz"
    _save_chunk(path, chunk, names)
    loaded = _load_chunk(path, names, rows=3)
    assert set(loaded) == set(names)
    for name in names:
        np.testing.assert_array_equal(loaded[name], chunk[name])
    assert _load_chunk(path, names, rows=4) is None  # a chunk of another size is recomputed
    assert _load_chunk(path, names[:3], rows=3) is None  # so is one holding other arrays


def test_mixed_precision_is_an_entry_of_its_own_close_to_float32(tmp_path):
    """--amp (bfloat16 autocast on the CPU, float16 on CUDA) changes the numbers slightly, so its
    entry has its own key and says so; the float32 entry is untouched and the two agree to bf16 precision."""
    torch.manual_seed(0)
    backbone = make_backbone(DigitsNet(num_classes=6).state_dict())
    images = load_dataset("digits", "test")
    store = FeatureStore(tmp_path)
    exact = extract(backbone, images, store, progress=False)
    mixed = extract(backbone, images, store, progress=False, amp=True)
    assert mixed.path != exact.path and mixed.meta["amp"] is True and exact.meta["amp"] is False
    assert entry_data_key(backbone, images, (), "float32", amp=True) == mixed.data_key
    assert not np.array_equal(mixed.logits, exact.logits)
    np.testing.assert_allclose(mixed.logits, exact.logits, atol=0.1, rtol=0.05)
    assert (mixed.logits.argmax(1) == exact.logits.argmax(1)).mean() > 0.95
    assert extract(backbone, images, store, progress=False).path == exact.path  # float32 found again, not amp


def test_the_device_is_not_part_of_an_entry_key_and_torchrun_picks_the_local_gpu(monkeypatch):
    """CPU and GPU extractions are the same entry (within float tolerance); under torchrun each
    process's 'auto'/'cuda' device is its LOCAL_RANK's GPU."""
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("auto") == torch.device("cuda:3") and resolve_device("cuda") == torch.device("cuda:3")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="--device cuda:4: torch sees 4 CUDA GPU\\(s\\), numbered from 0"):
        resolve_device("cuda:4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
