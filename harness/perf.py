"""Throughput benchmark (``make perf`` / ``python -m harness.perf``): measured ratios, not timed tests.

1. Extraction vs a bare forward pass: the same backbone over the same images, once as the
   minimal loop a user would write (preprocess + forward, outputs discarded) and once as
   ``extract()`` into an empty store (hooks, chunk files, HDF5 assembly with checksums).
2. Cache-only scoring vs re-inference: the energy score from the cached entry (open, verify,
   read logits, score) against running the network again to get the logits.

The backbone is the default benchmark's architecture with seeded random weights (throughput
does not depend on the weights); the images are the Fashion-MNIST test set when present, else
seeded Gaussian noise of the same shape. Results are printed and written as JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from extract.backbones import get_backbone_spec, registered_backbone
from extract.datasets import DatasetUnavailable, ImageSet, load_dataset
from extract.extraction import extract, resolve_device
from extract.store import CachedSplit, FeatureStore
from methods import make_method


def interleaved_best(repeats: int, **functions) -> dict[str, float]:
    """Smallest wall time of each function over ``repeats`` rounds, after one warm-up call each.

    Calls alternate between the functions within a round, so slow phases of a noisy machine
    hit all of them alike; the minimum is the run least disturbed by other work.
    """
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: min(values) for name, values in times.items()}


def measure(n: int, batch_size: int, device: str, repeats: int) -> dict:
    torch.manual_seed(0)
    spec = get_backbone_spec("cnn28")
    backbone = registered_backbone(spec, spec.build(num_classes=10).state_dict(), "cnn28-random", 10)
    try:
        images = load_dataset("fashion-mnist", "test")
    except DatasetUnavailable:
        images = load_dataset("gaussian", n=n)
    images = ImageSet(images.name, images.split, images.images[:n], images.labels[:n], images.source)
    torch_device = resolve_device(device)
    model = backbone.model.to(torch_device).eval()

    @torch.no_grad()
    def bare_forward():
        for start in range(0, len(images), batch_size):
            model(backbone.preprocessing(images.images[start:start + batch_size]).to(torch_device))

    def extraction():
        with tempfile.TemporaryDirectory() as root:
            extract(backbone, images, FeatureStore(root), batch_size=batch_size, device=device, progress=False)

    energy = make_method("energy")

    @torch.no_grad()
    def reinference():
        logits = [model(backbone.preprocessing(images.images[s:s + batch_size]).to(torch_device)).cpu().numpy()
                  for s in range(0, len(images), batch_size)]
        energy.score(type("Split", (), {"logits": np.concatenate(logits)})())

    with tempfile.TemporaryDirectory() as root:
        path = extract(backbone, images, FeatureStore(root), batch_size=batch_size, device=device,
                       progress=False).path
        best = interleaved_best(repeats, bare=bare_forward, extraction=extraction, rerun=reinference,
                                cache=lambda: energy.score(CachedSplit(path)))
    bare, extracted, rerun, from_cache = best["bare"], best["extraction"], best["rerun"], best["cache"]
    return {
        "images": len(images), "dataset": images.name, "batch_size": batch_size, "device": str(torch_device),
        "threads": torch.get_num_threads(),
        "bare_forward_img_per_s": len(images) / bare, "extraction_img_per_s": len(images) / extracted,
        "extraction_over_bare_forward": extracted / bare,
        "score_from_cache_s": from_cache, "score_by_reinference_s": rerun,
        "reinference_over_cache_scoring": rerun / from_cache,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="number of images (default 10000)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("out/perf.json"))
    args = parser.parse_args(argv)
    result = measure(args.n, args.batch_size, args.device, args.repeats)
    print(f"{result['images']} {result['dataset']} images, batch {result['batch_size']}, {result['device']} "
          f"({result['threads']} threads), best of {args.repeats}")
    print(f"bare forward pass : {result['bare_forward_img_per_s']:9.0f} img/s")
    print(f"extraction        : {result['extraction_img_per_s']:9.0f} img/s "
          f"({result['extraction_over_bare_forward']:.2f}x the bare forward time)")
    print(f"energy from cache : {result['score_from_cache_s'] * 1e3:9.1f} ms")
    print(f"energy by re-inference: {result['score_by_reinference_s'] * 1e3:9.1f} ms "
          f"({result['reinference_over_cache_scoring']:.0f}x the cache-only time)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
