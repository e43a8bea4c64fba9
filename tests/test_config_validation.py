"""Benchmark files are checked when they are read: every key's type and range (the message names
the file and the path of keys), OOD or validation sets that are the ID test or fit split itself,
and the seeds (``check_seeds``, shared with the CLI's --seeds). Parsing only: milliseconds a file."""
from __future__ import annotations

import pytest
import yaml

from harness.config import BENCHMARK_DIR, SEED_LIMIT, BenchmarkError, check_seeds, load_benchmark

DIGITS_NET = "{name: digits-net, arch: digits-net, train: {epochs: 2}}"
# A benchmark whose second backbone fine-tunes the first; `FT % "key: value"` sets one recipe key.
FT = "backbones: [" + DIGITS_NET + ", {name: ft, finetune: {from: digits-net, epochs: 1, %s}}]"
# A user model from `module:factory` + checkpoint; `USER % "key: value"` adds or replaces keys.
USER = ("backbones: [{name: user, factory: 'mod:make', checkpoint: w.pt, head: fc, "
        "preprocessing: {input_size: 8, channels: 1, mean: [0.5], std: [0.5]}, %s}]")
PRE = "preprocessing: {input_size: 8, channels: 1, mean: [0.5], std: [0.5], %s}"


def write_bench(tmp_path, snippet: str):
    """The packaged digits benchmark with the top-level keys of the YAML ``snippet`` replaced (those
    of ``id`` merged into its own), as a file."""
    config = yaml.safe_load((BENCHMARK_DIR / "digits.yaml").read_text())
    override = yaml.safe_load(snippet)
    config["id"].update(override.pop("id", {}))
    config.update(override)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("snippet, message", [
    # top level
    ("name: 5", "name must be a string, got 5"),
    ("description: [a, b]", "description must be a string, got ['a', 'b']"),
    ("convention: sideways", "convention 'sideways' is not one of ('id_positive', 'ood_positive')"),
    ("methods: msp", "methods must be a list or null, got 'msp'"),
    ("methods: [{name: energy, params: [1]}]", "methods #1: params must be a mapping, got [1]"),
    ("methods: [{name: 5}]", "methods #1: name must be a string, got 5"),
    ("backbones: digits-net", "backbones must be a list, got 'digits-net'"),
    ("backbones: []", "no backbones listed under 'backbones'"),
    # id
    ("id: {num_classes: six}", "id: num_classes must be an integer >= 2, got 'six'"),
    ("id: {num_classes: 1}", "id: num_classes must be an integer >= 2, got 1"),
    ("id: {num_classes: true}", "id: num_classes must be an integer >= 2, got True"),
    ("id: {num_classes: 6.0}", "id: num_classes must be an integer >= 2, got 6.0"),
    ("id: {fit_split: 3}", "id: fit_split must be a string, got 3"),
    ("id: {dataset: [digits]}", "id: dataset must be a string, got ['digits']"),
    ("id: {test_params: [1]}", "id: test_params must be a mapping or null, got [1]"),
    ("id: {test_params: {seed: x}}", "id: test_params: seed must be an integer, got 'x'"),
    ("id: {fit_params: {test_fraction: half}}", "id fit split: fit_params: test_fraction must be a number, got 'half'"),
    # ood and validation sets, their parameters typed by the dataset registry's defaults
    ("ood: 5", "ood must be a list or a mapping, got 5"),
    ("ood: {near: digits}", "ood: near must be a list or null, got 'digits'"),
    ("ood: {far: [{dataset: gaussian, params: {n: many}}]}", "ood far #1: params: n must be an integer, got 'many'"),
    ("ood: {far: [{dataset: gaussian, params: {size: 8.5}}]}", "ood far #1: params: size must be an integer, got 8.5"),
    ("ood: {far: [{dataset: gaussian, params: {n: true}}]}", "ood far #1: params: n must be an integer, got True"),
    ("ood: [{dataset: 7}]", "ood #1: dataset must be a string, got 7"),
    ("ood: [{dataset: gaussian, split: [test]}]", "ood #1: split must be a string, got ['test']"),
    ("ood: [{dataset: gaussian, name: 1}]", "ood #1: name must be a string, got 1"),
    ("ood: [{dataset: gaussian, params: 5}]", "ood #1: params must be a mapping, got 5"),
    ("validation: 3", "validation must be a string or a mapping or null, got 3"),
    ("validation: {dataset: uniform, params: {seed: '1'}}", "validation: params: seed must be an integer, got '1'"),
    # seeds
    ("seeds: [-1]", "seeds must be a non-empty list of distinct integers in [0, 2**63)"),
    ("seeds: [0, 0]", "seeds must be a non-empty list of distinct integers in [0, 2**63)"),
    ("seeds: 0", "seeds must be a non-empty list of distinct integers in [0, 2**63)"),
    # extraction
    ("extraction: {batch_size: -5}", "extraction: batch_size must be an integer >= 1, got -5"),
    ("extraction: {batch_size: 0}", "extraction: batch_size must be an integer >= 1, got 0"),
    ("extraction: {batch_size: '64'}", "extraction: batch_size must be an integer >= 1, got '64'"),
    ("extraction: {batch_size: 2.5}", "extraction: batch_size must be an integer >= 1, got 2.5"),
    ("extraction: {layers: block1}", "extraction: layers must be a list of strings, got 'block1'"),
    ("extraction: {layers: [1]}", "extraction: layers must be a list of strings, got [1]"),
    ("extraction: {activations_dtype: float64}",
     "extraction: activations_dtype 'float64' is not one of ('float32', 'float16')"),
    ("extraction: [256]", "extraction must be a mapping, got [256]"),
    # a registry backbone and its `train:` recipe (extract.training.Recipe)
    ("backbones: [{name: 5, arch: digits-net}]", "backbones #1: name must be a string, got 5"),
    ("backbones: [{name: n, arch: 5}]", "backbones #1 (n): arch must be a string, got 5"),
    ("backbones: [{name: n, arch: digits-net, checkpoint: 5}]", "backbones #1 (n): checkpoint must be a string, got 5"),
    ("backbones: [{name: n, arch: digits-net, train: 5}]", "backbones #1 (n): train must be a mapping, got 5"),
    ("backbones: [{name: digits-net, arch: digits-net, train: {epochs: lots}}]",
     "backbones #1 (digits-net): train: epochs must be an integer >= 1, got 'lots'"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: 0}}]",
     "backbones #1 (n): train: epochs must be an integer >= 1, got 0"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: true}}]",
     "backbones #1 (n): train: epochs must be an integer >= 1, got True"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: 1, lr: 1e-3}}]",  # YAML 1.1 reads 1e-3 as a string
     "backbones #1 (n): train: lr must be a number > 0, got '1e-3'"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: 1, lr: 0}}]",
     "backbones #1 (n): train: lr must be a number > 0, got 0"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: 1, lr: .inf}}]",
     "backbones #1 (n): train: lr must be a number > 0, got inf"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: 1, batch_size: -1}}]",
     "backbones #1 (n): train: batch_size must be an integer >= 1, got -1"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: 1, momentum: -0.1}}]",
     "backbones #1 (n): train: momentum must be a number >= 0, got -0.1"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: 1, weight_decay: none}}]",
     "backbones #1 (n): train: weight_decay must be a number >= 0, got 'none'"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: 1, milestones: [0.5, 2]}}]",
     "backbones #1 (n): train: milestones must be a list of numbers in (0, 1), got [0.5, 2]"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: 1, milestones: 0.5}}]",
     "backbones #1 (n): train: milestones must be a list of numbers in (0, 1), got 0.5"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: 1, gamma: 2}}]",
     "backbones #1 (n): train: gamma must be a number in (0, 1], got 2"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: 1, snapshot_every: -1}}]",
     "backbones #1 (n): train: snapshot_every must be an integer >= 0, got -1"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: 1, optimizer: lbfgs}}]",
     "backbones #1 (n): train: optimizer 'lbfgs' is not one of ('sgd', 'adam', 'adamw')"),
    ("backbones: [{name: n, arch: digits-net, train: {epochs: 1, augmentation: 1}}]",
     "backbones #1 (n): train: augmentation 1 is not one of ('none', 'flip', 'crop')"),
    ("backbones: [{name: n, arch: digits-net, train: {lr: 0.1}}]",
     "backbones #1 (n): train: missing keys ['epochs'], unknown keys []"),
    # a fine-tuned backbone's `finetune:` recipe (extract.finetuning.FineTuneRecipe)
    ("backbones: [" + DIGITS_NET + ", {name: ft, finetune: 5}]",
     "backbones #2 (ft): finetune must be a mapping, got 5"),
    ("backbones: [" + DIGITS_NET + ", {name: ft, finetune: {from: 5, epochs: 1}}]",
     "backbones #2 (ft): finetune: from must be a string, got 5"),
    (FT % "epochs: 0", "backbones #2 (ft): finetune: epochs must be an integer >= 1, got 0"),
    (FT % "delta: 1.5", "backbones #2 (ft): finetune: delta must be a number in (0, 1], got 1.5"),
    (FT % "keep: 0", "backbones #2 (ft): finetune: keep must be a number in (0, 1], got 0"),
    (FT % "zeta: -1", "backbones #2 (ft): finetune: zeta must be a number >= 0 or null, got -1"),
    (FT % "zeta: small", "backbones #2 (ft): finetune: zeta must be a number >= 0 or null, got 'small'"),
    (FT % "outlier_batch_size: 0", "backbones #2 (ft): finetune: outlier_batch_size must be an integer >= 1, got 0"),
    (FT % "oe_weight: x", "backbones #2 (ft): finetune: oe_weight must be a number >= 0, got 'x'"),
    (FT % "m_in: x", "backbones #2 (ft): finetune: m_in must be a number, got 'x'"),
    (FT % "doe_warmup: -1", "backbones #2 (ft): finetune: doe_warmup must be an integer >= 0, got -1"),
    (FT % "poem_keep: 0", "backbones #2 (ft): finetune: poem_keep must be an integer >= 1 or null, got 0"),
    (FT % "objective: xe", "backbones #2 (ft): finetune: objective 'xe' is not one of ('ce', 'oe', 'energy', "
                           "'doe', 'poem')"),
    (FT % "forget: 1", "backbones #2 (ft): finetune: forget 1 is not one of ('none', 'um', 'umap')"),
    (FT % "objective: oe, outliers: 5", "backbones #2 (ft): finetune: outliers must be a string or a mapping, got 5"),
    (FT % "objective: oe, outliers: {dataset: hopper-patches, params: {n: x}}",
     "backbones #2 (ft): outliers: params: n must be an integer, got 'x'"),
    # a user model's keys and preprocessing
    (USER % "kwargs: [1]", "backbones #1 (user): kwargs must be a mapping, got [1]"),
    (USER % "layers: fc", "backbones #1 (user): layers must be a list of strings, got 'fc'"),
    (USER % "head: 5", "backbones #1 (user): head must be a string, got 5"),
    (USER % "shaping_layer: [a]", "backbones #1 (user): shaping_layer must be a string, got ['a']"),
    (USER % "factory: 5", "backbones #1 (user): factory must be a string, got 5"),
    (USER % (PRE % "input_size: '8'"), "backbones #1 (user): preprocessing: input_size must be an integer >= 1, "
                                       "got '8'"),
    (USER % (PRE % "input_size: 0"), "backbones #1 (user): preprocessing: input_size must be an integer >= 1, got 0"),
    (USER % (PRE % "channels: 2"), "backbones #1 (user): preprocessing: channels 2 is not one of (1, 3)"),
    (USER % (PRE % "mean: [a]"), "backbones #1 (user): preprocessing: mean must be a list of numbers, got ['a']"),
    (USER % (PRE % "std: [0]"), "backbones #1 (user): preprocessing: std must be a list of numbers > 0, got [0]"),
    (USER % (PRE % "std: 0.5"), "backbones #1 (user): preprocessing: std must be a list of numbers > 0, got 0.5"),
    (USER % (PRE % "resize_to: -1"), "backbones #1 (user): preprocessing: resize_to must be an integer >= 0, got -1"),
    (USER % (PRE % "mean: [0.5, 0.5]"), "backbones #1 (user): preprocessing mean/std need 1 values each"),
])
def test_a_wrong_value_is_refused_naming_the_file_and_the_key(tmp_path, snippet, message):
    path = write_bench(tmp_path, snippet)
    with pytest.raises(BenchmarkError) as caught:
        load_benchmark(path)
    assert str(caught.value).startswith(f"{path}: {message}"), str(caught.value)


@pytest.mark.parametrize("snippet, role, where", [
    ("ood: {near: [{dataset: digits, split: test}]}", "test", "ood near #1"),
    ("ood: {near: [{dataset: digits, split: test, params: {seed: 0}}]}", "test", "ood near #1"),  # the default
    ("ood: [{dataset: digits, split: train, name: again}]", "fit", "ood #1"),
    ("validation: {dataset: digits, split: test}", "test", "validation"),
    ("validation: {dataset: digits, split: train}", "fit", "validation"),
])
def test_an_ood_or_validation_set_that_is_the_id_test_or_fit_split_is_refused(tmp_path, snippet, role, where):
    path = write_bench(tmp_path, snippet)
    with pytest.raises(BenchmarkError) as caught:
        load_benchmark(path)
    assert str(caught.value).startswith(f"{path}: {where}: 'digits' split '{'train' if role == 'fit' else 'test'}' "
                                        f"with the same parameters is the ID {role} split itself"), str(caught.value)


def test_other_splits_or_parameters_of_the_id_dataset_stay_accepted(tmp_path):
    bench = load_benchmark(write_bench(tmp_path, "ood: {near: [{dataset: digits, split: ood}, "
                                                 "{dataset: digits, split: test, name: reshuffled, "
                                                 "params: {seed: 1}}]}"))
    assert [(r.dataset, r.split, r.params) for r in bench.ood][:2] == [("digits", "ood", {}),
                                                                      ("digits", "test", {"seed": 1})]


def test_an_id_fit_split_that_is_the_test_split_is_refused(tmp_path):
    path = write_bench(tmp_path, "id: {fit_split: test}")
    with pytest.raises(BenchmarkError, match="id: the fit split \\('test'\\) and the test split are the same data"):
        load_benchmark(path)


@pytest.mark.parametrize("seeds", [[-1], [2**64], [0, 0], [], [True], "1", 1, [1.0], [SEED_LIMIT], None])
def test_check_seeds_refuses_what_a_consumer_could_not_take_and_names_where(seeds):
    with pytest.raises(BenchmarkError, match="^--seeds must be a non-empty list of distinct integers in "
                                             "\\[0, 2\\*\\*63\\)"):
        check_seeds(seeds, "--seeds")


def test_check_seeds_accepts_distinct_seeds_in_range_and_every_consumer_takes_them():
    import numpy as np
    import torch

    from extract.training import epoch_generator

    assert check_seeds([0, 1, SEED_LIMIT - 1], "--seeds") == (0, 1, SEED_LIMIT - 1)
    assert check_seeds((5,), "x") == (5,)
    for seed in (0, 4294, 4295, SEED_LIMIT - 1):
        epoch_generator(seed, 1_000_000)
        torch.manual_seed(seed)
        np.random.default_rng(seed)
    # the epoch seed of the seeds that worked before is unchanged (it was np.uint32(seed * 1000003 + epoch))
    assert epoch_generator(4294, 7).initial_seed() == int(np.uint32(4294 * 1_000_003 + 7))


@pytest.mark.parametrize("path", sorted(BENCHMARK_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_packaged_benchmark_file_parses(path):
    bench = load_benchmark(path)
    assert bench.name == path.stem and bench.ood and bench.backbones
