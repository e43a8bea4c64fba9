"""``make perf`` part ``pytorch-ood``: this harness against pytorch-ood 0.4.0, side by side.

Both sides run the fashion-mnist benchmark's trained ``cnn28`` (its weights from the cache; trained
first on a cold cache, as the ``reinference`` part does) over the same images: Fashion-MNIST train
(60,000) as the fit set, Fashion-MNIST test (10,000) as ID, and MNIST, notMNIST and Gaussian noise
(10,000 each) as OOD; an OOD set whose files are absent is left out and listed. Both score the same
ten methods with the same settings: the harness's defaults, handed to pytorch-ood's detectors.

- cold: pytorch-ood's ``fit`` + ``predict`` for each detector, which runs the network over the fit
  set (detectors that fit) and over the four test sets every time, against the harness's
  extraction of the five sets into an empty cache (once for all methods) plus each method's fit
  and scoring from that cache;
- re-score: one method again (energy): pytorch-ood's ``predict`` over the four test sets again,
  against the harness scoring them from the cache.

The timed rounds alternate the two sides method by method (``harness.perf.interleaved_best``),
so a busy machine slows both alike. Neither side's time includes loading the datasets or computing
metrics. pytorch-ood is favoured twice: its batches are preprocessed once, before timing (the
harness's extraction times its own preprocessing), and its predictions run under
``torch.no_grad``. The AUROCs of both sides come from the same function (``results.metrics.auroc``).
"""
from __future__ import annotations

import importlib.metadata
import tempfile
import time

from extract.store import CachedSplit, FeatureStore
from harness.resolution import RunOptions
from methods import make_method
from methods.distance_scores import vim_principal_dim
from results.metrics import auroc

BENCHMARK, BACKBONE = "fashion-mnist", "cnn28"
OOD_SETS = ("mnist", "notmnist", "gaussian")
FIT, TEST = "fit", "test"  # the labels of the fit set and the ID test set among the sets compared
# the ten methods by their harness names (mahalanobis: the penultimate, tied-covariance one)
METHODS = ("msp", "energy", "maxlogit", "react", "ash_s", "knn", "vim", "mahalanobis", "klm", "dice")
RESCORE_METHOD = "energy"
TARGETS = {"cold": 5.0, "rescore": 100.0}  # issue 18: how many times faster the harness should be


def network_parts(backbone):
    """What pytorch-ood's detectors are built from: the whole network (logits), the encoder up to
    the penultimate feature (B x D) and the linear head; written for the registry's SmallCNN
    (``cnn28``), as a pytorch-ood user would write them for their network."""
    import torch

    model = backbone.model
    return model, torch.nn.Sequential(model.block1, model.block2, model.block3, model.pool), model.fc


def pytorch_ood_detector(name: str, model, encoder, head):
    """pytorch-ood's detector for the harness method ``name``, with the harness's default settings
    (pytorch-ood takes percentiles as fractions)."""
    from pytorch_ood import detector as ood

    params = make_method(name).get_params()
    W, b = head.weight.detach(), head.bias.detach()
    builders = {
        "msp": lambda: ood.MaxSoftmax(model),
        "energy": lambda: ood.EnergyBased(model, t=params["T"]),
        "maxlogit": lambda: ood.MaxLogit(model),
        "react": lambda: ood.ReAct(encoder, head, percentile=params["p"] / 100),
        # ASH shapes 4-D maps: the pooled feature as B x D x 1 x 1, as pytorch-ood's docs say
        "ash_s": lambda: ood.ASH(lambda x: encoder(x)[:, :, None, None], lambda v: head(v.flatten(1)),
                                 variant="ash-s", percentile=params["p"] / 100),
        "knn": lambda: ood.KNN(encoder, k=params["k"]),
        "vim": lambda: ood.ViM(encoder, d=params["dim"] or vim_principal_dim(W.shape[1]), w=W, b=b),
        "mahalanobis": lambda: ood.Mahalanobis(encoder),
        "klm": lambda: ood.KLMatching(model),
        "dice": lambda: ood.DICE(encoder, w=W, b=b, p=params["p"] / 100),
    }
    return builders[name]()


def predict_by_network(detector, batches: dict, device) -> dict:
    """pytorch-ood's ``predict`` over every test set, batch by batch (a network pass each), negated
    to the harness's sign (higher = more in-distribution)."""
    import torch

    with torch.no_grad():
        return {label: -torch.cat([detector.predict(x.to(device)) for x, _ in set_batches]).double().cpu().numpy()
                for label, set_batches in batches.items() if label != FIT}


def score_from_cache(method, entries: dict) -> dict:
    """The harness's scores of every test set, read from their cache entries."""
    return {label: method.score_samples(CachedSplit(path)) for label, path in entries.items() if label != FIT}


def compare(backbone, sets: dict, *, best_of, methods=METHODS, batch_size: int = 500, device: str = "cpu",
            repeats: int = 1) -> dict:
    """Time both sides on ``sets`` (label -> ``ImageSet``: ``FIT``, ``TEST`` and the OOD sets) and
    compute their AUROCs. ``best_of`` is ``harness.perf.interleaved_best``, passed in because
    harness.perf imports this module. ``methods`` must include ``RESCORE_METHOD``."""
    import torch

    from extract.extraction import extract, resolve_device

    try:
        version = importlib.metadata.version("pytorch-ood")
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError("the pytorch-ood part needs pytorch-ood 0.4.0, in the test extra: "
                          "pip install -e '.[test]'") from err
    torch_device = resolve_device(device)
    model, encoder, head = network_parts(backbone)
    model.to(torch_device).eval()
    batches = {label: [(backbone.preprocessing(images.images[start:start + batch_size]),
                        torch.from_numpy(images.labels[start:start + batch_size]))
                       for start in range(0, len(images), batch_size)]
               for label, images in sets.items()}
    scores = {"pytorch_ood": {}, "harness": {}}  # each method's scores from the last round, for the AUROCs
    fitted = {}  # (side, method) -> the detector or method fitted in the last round, for the re-score
    entries = {}  # label -> the cache entry written by the last extraction

    with tempfile.TemporaryDirectory() as root:
        def extraction():
            store = FeatureStore(tempfile.mkdtemp(dir=root))  # an empty cache every round
            entries.update({label: extract(backbone, images, store, batch_size=batch_size, device=device,
                                           progress=False).path for label, images in sets.items()})

        def by_network(name):
            def run():
                detector = pytorch_ood_detector(name, model, encoder, head).to(torch_device)
                detector.fit(batches[FIT])  # a no-op for detectors that do not fit
                scores["pytorch_ood"][name] = predict_by_network(detector, batches, torch_device)
                fitted["pytorch_ood", name] = detector
            return run

        def from_cache(name):
            def run():
                method = make_method(name).fit(CachedSplit(entries[FIT]))
                scores["harness"][name] = score_from_cache(method, entries)
                fitted["harness", name] = method
            return run

        runs = {"extraction": extraction}
        for name in methods:
            runs[f"pytorch-ood {name}"], runs[f"harness {name}"] = by_network(name), from_cache(name)
        runs["pytorch-ood re-score"] = lambda: predict_by_network(fitted["pytorch_ood", RESCORE_METHOD], batches,
                                                                  torch_device)
        runs["harness re-score"] = lambda: score_from_cache(fitted["harness", RESCORE_METHOD], entries)
        best = best_of(repeats, **runs)

    ood_labels = [label for label in sets if label not in (FIT, TEST)]
    rows = []
    for name in methods:
        aurocs = {label: {side: auroc(scores[side][name][TEST], scores[side][name][label]) for side in scores}
                  for label in ood_labels}
        rows.append({"method": name, "pytorch_ood_s": best[f"pytorch-ood {name}"], "harness_s": best[f"harness {name}"],
                     "auroc": aurocs,
                     "max_auroc_difference": max(abs(a["pytorch_ood"] - a["harness"]) for a in aurocs.values())})
    pytorch_ood_cold = sum(row["pytorch_ood_s"] for row in rows)
    scoring = sum(row["harness_s"] for row in rows)
    harness_cold = best["extraction"] + scoring
    rescore = {"method": RESCORE_METHOD, "pytorch_ood_s": best["pytorch-ood re-score"],
               "harness_s": best["harness re-score"]}
    rescore["speedup"] = rescore["pytorch_ood_s"] / rescore["harness_s"]
    return {"pytorch_ood_version": version, "sets": {label: len(images) for label, images in sets.items()},
            "batch_size": batch_size, "device": str(torch_device), "threads": torch.get_num_threads(),
            "repeats": repeats, "methods": rows, "extraction_s": best["extraction"],
            "pytorch_ood_cold_s": pytorch_ood_cold, "harness_scoring_s": scoring, "harness_cold_s": harness_cold,
            "cold_speedup": pytorch_ood_cold / harness_cold,
            # what holds the cold ratio back: with free scoring it would be this (extraction is one pass) ...
            "cold_speedup_if_scoring_were_free": pytorch_ood_cold / best["extraction"],
            # ... and the scoring time that the cold target leaves after the extraction
            "scoring_budget_for_cold_target_s": pytorch_ood_cold / TARGETS["cold"] - best["extraction"],
            "rescore": rescore, "targets": TARGETS}


def print_comparison(result: dict) -> None:
    sets = ", ".join(f"{label} {n}" for label, n in result["sets"].items())
    print(f"pytorch-ood {result['pytorch_ood_version']} vs the harness: {sets}; batch {result['batch_size']}, "
          f"{result['device']} ({result['threads']} threads), best of {result['repeats']} interleaved")
    print(f"  {'method':12s} {'pytorch-ood fit+predict':>24s} {'harness from cache':>19s}   max |AUROC diff|")
    for row in result["methods"]:
        print(f"  {row['method']:12s} {row['pytorch_ood_s']:22.2f} s {row['harness_s']:17.2f} s   "
              f"{row['max_auroc_difference']:.2e}")
    print(f"  {'extraction':12s} {'':24s} {result['extraction_s']:17.2f} s")
    print(f"  cold: pytorch-ood {result['pytorch_ood_cold_s']:.1f} s, harness {result['harness_cold_s']:.1f} s "
          f"(extraction {result['extraction_s']:.1f} s + scoring {result['harness_scoring_s']:.1f} s): "
          f"{result['cold_speedup']:.1f}x (target {TARGETS['cold']:g}x; "
          f"{result['cold_speedup_if_scoring_were_free']:.1f}x if scoring were free)")
    rescore = result["rescore"]
    print(f"  re-score {rescore['method']}: pytorch-ood {rescore['pytorch_ood_s']:.2f} s, harness "
          f"{rescore['harness_s'] * 1e3:.0f} ms: {rescore['speedup']:.0f}x (target {TARGETS['rescore']:g}x)")


def measure_pytorch_ood(options: RunOptions, repeats: int, best_of) -> dict:
    """The comparison on the fashion-mnist benchmark's data with its trained ``cnn28``."""
    from harness.config import load_benchmark
    from harness.pipeline import BenchmarkRun

    benchmark = load_benchmark(BENCHMARK)
    run = BenchmarkRun(benchmark, options)
    config = next(c for c in benchmark.backbones if c.name == BACKBONE)
    started = time.perf_counter()
    backbone = run.backbone(config, benchmark.seeds[0])  # the trained weights from the cache
    available = run.datasets()
    sets = {FIT: run.training_set(), TEST: available[benchmark.id_test.label][1],
            **{label: available[label][1] for label in OOD_SETS if label in available}}
    absent = [label for label in OOD_SETS if label not in available]
    print(f"{BACKBONE} ({backbone.key}) and the datasets loaded in {time.perf_counter() - started:.1f} s"
          + (f"; absent, left out: {', '.join(absent)}" if absent else ""), flush=True)
    result = compare(backbone, sets, best_of=best_of, batch_size=benchmark.batch_size, device=options.device,
                     repeats=repeats)
    print_comparison(result)
    return {"benchmark": BENCHMARK, "backbone": BACKBONE, "backbone_key": backbone.key, "absent": absent, **result}
