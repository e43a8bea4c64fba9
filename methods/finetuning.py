"""Fine-tune a backbone by a ``extract.finetuning.FineTuneRecipe``: Unleashing Mask (UM), UMAP,
outlier exposure, energy-bounded training, DOE and POEM, alone or combined (METHODS.md section 2;
the losses are in ``methods.training_objectives``).

What is about the objectives lives here: UMAP's popup network, DOE's and POEM's training state,
zeta's estimate and the loss of each step. The epochs themselves (resumable, seeded data order,
checked weights files) are ``extract.training.train_epochs``, which knows nothing about OOD
objectives. A fine-tuned model is a backbone like any other: its weights are cached under
``<cache>/weights/`` at ``extract.finetuning.finetune_path`` (keyed by the base backbone's content
key, the recipe, the training and outlier sets and the seed), and extracted, scored and tabulated
through the normal cache.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from extract.backbones import Backbone
from extract.datasets import ImageSet
from extract.extraction import capture_outputs
from extract.finetuning import FineTuneRecipe, finetune_path
from extract.training import (
    augment,
    cached_weights,
    class_labels,
    cpu_state,
    gradient_step,
    padding_fill,
    test_tensors,
    train_epochs,
)
from methods.training_objectives import (
    DOE_GAMMAS,
    POEM_SIGMA,
    POEM_SIGMA_N,
    bayesian_posterior,
    boundary_outliers,
    energy_bounded_loss,
    estimate_zeta,
    extrapolation_direction,
    id_loss,
    keep_mask,
    masked_layers,
    masked_weights,
    oe_loss,
    popup_mask,
    popup_scores,
    thompson_sample,
    uniform_cross_entropy,
)

log = logging.getLogger(__name__)

ZETA_BATCH = 512  # the UM code's estimate_loss batch size
DOE_CLIP = 1.0  # DOE clips the gradient norm of the trained parameters at 1 for every update
FEATURE_BATCH = 1024  # POEM's penultimate features are computed in batches of this size


class PopupNetwork(nn.Module):
    """UMAP (METHODS.md 2.2): a frozen network whose every Conv/Linear weight is used as W * m_p(s),
    m_p keeping the top ``keep`` fraction of |s| per layer; only the scores s train (straight-through
    estimator). With ``bn_stats='frozen'`` batch norm keeps its running statistics in training."""

    def __init__(self, model: nn.Module, keep: float, seed: int, bn_stats: str = "frozen"):
        super().__init__()
        self.model, self.keep, self.bn_stats = model, keep, bn_stats
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.layers = masked_layers(model)
        initial = popup_scores(model, seed)
        # ParameterDict keys cannot hold dots
        self.scores = nn.ParameterDict({name.replace(".", "/"): nn.Parameter(initial[name]) for name in self.layers})

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.bn_stats == "frozen":
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def masks(self, hard: bool = False) -> dict[str, torch.Tensor]:
        make = keep_mask if hard else popup_mask
        return {name: make(self.scores[name.replace(".", "/")], self.keep) for name in self.layers}

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, masked_weights(self.model, self.masks()), (inputs,))

    def effective_state(self) -> dict[str, torch.Tensor]:
        """The network's state with every masked weight replaced by W * m: a plain backbone's weights."""
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        with torch.no_grad():
            state.update({k: v.detach().cpu().clone()
                          for k, v in masked_weights(self.model, self.masks(hard=True)).items()})
        return state


class DiversifiedOutlierExposure(nn.Module):
    """DOE (Zhu et al. 2023, "Diversified Outlier Exposure for OOD detection via informative
    extrapolation"; METHODS.md 2.5b) around ``network``; ``doe_step`` is its training step.

    Warm-up (the first ``warmup_steps`` updates): L = ID term + L_OE(outliers), L_OE = mean_out
    [LSE(f) - mean_c f_c]. Afterwards, every step draws gamma uniformly from ``gammas``, takes
    diff = ``extrapolation_direction`` (used as is on the first post-warm-up step, then averaged:
    diff <- 0.6 diff + 0.4 new), updates on L_OE at w + gamma * diff and then on the ID term (CE,
    or UM's |CE - zeta| + zeta) at the weights so updated; every update clips the trained
    parameters' gradient norm at 1. ``names`` are the trained parameters (UMAP: its scores).

    State: the buffers ``updates`` (count of updates taken) and ``diff0``, ``diff1``, ... (the
    running diff) are in ``state_dict()``, which ``train_epochs`` saves to resume, so a resumed run
    continues the same average; gamma comes from a generator seeded by (seed, update count), so it
    repeats too. Only ``network`` is exported.

    The official code's quirks, recorded and not copied: it clips the *model's* gradient before the
    proxy step, which leaves the proxy's step unclipped anyway (here: no clipping there); its
    perturbed forward pass updates the batch-norm running statistics (here it runs on copies of
    them, so only the unperturbed pass moves them); it adds gamma * diff in place, steps and
    subtracts it again (here the perturbed weights exist only inside one functional call, so the
    update lands on w exactly - the same gradient, without the add/subtract rounding; weight decay
    then acts on w rather than on w + gamma * diff).
    """

    def __init__(self, network: nn.Module, trainable, *, zeta: float | None, warmup_steps: int, seed: int,
                 gammas: tuple[float, ...] = DOE_GAMMAS):
        super().__init__()
        self.network, self.zeta, self.warmup_steps, self.seed, self.gammas = network, zeta, warmup_steps, seed, gammas
        trained = {id(parameter) for parameter in trainable}
        self.names = [name for name, parameter in network.named_parameters() if id(parameter) in trained]
        parameters = dict(network.named_parameters())
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        for index, name in enumerate(self.names):
            self.register_buffer(f"diff{index}", torch.zeros_like(parameters[name]))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.network(inputs)

    @property
    def diffs(self) -> list[torch.Tensor]:
        return [getattr(self, f"diff{index}") for index in range(len(self.names))]

    def gamma(self) -> float:
        """This update's perturbation strength, uniform over ``gammas``, seeded by (seed, update count)."""
        return float(np.random.default_rng([self.seed, int(self.updates)]).choice(self.gammas))

    def average_direction(self, batch: torch.Tensor, num_id: int) -> None:
        """diff <- the new extrapolation direction on the first post-warm-up update, else 0.6 diff + 0.4 new."""
        first = int(self.updates) == self.warmup_steps
        new = extrapolation_direction(self.network, self.names, batch, num_id)  # detached
        for diff, direction in zip(self.diffs, new):
            diff.copy_(direction if first else 0.6 * diff + 0.4 * direction)

    def perturbed(self, batch: torch.Tensor, gamma: float) -> torch.Tensor:
        """The network's output at w + gamma * diff, on copies of its buffers (batch-norm statistics untouched)."""
        parameters = dict(self.network.named_parameters())
        weights = {name: parameters[name] + gamma * diff for name, diff in zip(self.names, self.diffs)}
        buffers = {name: buffer.clone() for name, buffer in self.network.named_buffers()}
        return torch.func.functional_call(self.network, {**buffers, **weights}, (batch,))


def _clipped_update(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], DOE_CLIP)
    optimizer.step()


def doe_step(model: DiversifiedOutlierExposure, optimizer, inputs, labels, outliers):
    """``train_epochs``'s step for DOE (see ``DiversifiedOutlierExposure``): returns the loss (the sum of
    the two losses after warm-up) and the ID logits (of the unperturbed pass)."""
    batch, num_id = torch.cat([inputs, outliers]), len(inputs)  # one train-mode pass: batch norm sees both
    if int(model.updates) < model.warmup_steps:
        logits = model(batch)
        loss = oe_loss(logits[:num_id], labels, logits[num_id:], weight=1.0, zeta=model.zeta)
        _clipped_update(optimizer, loss)
        model.updates.add_(1)
        return loss.item(), logits[:num_id]
    gamma = model.gamma()
    model.average_direction(batch, num_id)
    outlier_loss = uniform_cross_entropy(model.perturbed(batch, gamma)[num_id:])
    _clipped_update(optimizer, outlier_loss)
    logits = model(batch)
    id_term = id_loss(logits[:num_id], labels, model.zeta)
    _clipped_update(optimizer, id_term)
    model.updates.add_(1)
    return outlier_loss.item() + id_term.item(), logits[:num_id]


class PosteriorSampling(nn.Module):
    """POEM (Ming et al. 2022, "POEM: Out-of-distribution detection with posterior sampling";
    METHODS.md 2.5) around ``network``: ``poem_selection`` is ``train_epochs``'s ``before_epoch``,
    which picks each epoch's outliers; the loss is the energy-bounded one.

    At the start of every epoch, a Bayesian linear regression y = beta^T z + n on the penultimate
    features z (the input of the module ``head``) of the current network, with targets -``conf``
    (ID) and +``conf`` (outliers) plus noise n ~ N(0, sigma_n = 0.5), gives the posterior N(mu, Sigma)
    (``bayesian_posterior``); a Thompson sample beta of it chooses the ``keep`` outliers of the pool
    with the smallest |beta^T z|. The regression's data, as POEM's buffer of BUF_SIZE = ``buffer``
    (4) epochs: the outliers chosen in the last ``buffer`` epochs (features recomputed by the current
    network) and, as the official code repeats its ID images once per buffered epoch, ``keep``
    seeded random ID samples repeated as often. In the first epoch there are none, so beta comes
    from the prior N(0, sigma I), sigma = 20. Differences from the official code: its ID images are
    the whole training set (here a seeded sample of ``keep``, drawn anew each epoch), its noise one
    scalar drawn once (here one draw per target and epoch), and its buffered outliers the augmented
    crops trained on (here the pool's rows).

    State: the posterior is recomputed from scratch each epoch from the network's current weights,
    the buffer ``selected`` (row e mod ``buffer`` holds epoch e's choice; in ``state_dict()``, which
    ``train_epochs`` saves to resume) and the epoch's seeded generator, so a resumed run picks the
    same outliers. Only ``network`` is exported.
    """

    def __init__(self, network: nn.Module, head: str, inputs: torch.Tensor, pool: torch.Tensor, *, keep: int,
                 conf: float, device: str, buffer: int = 4):
        super().__init__()
        if not 1 <= keep <= len(pool):
            raise ValueError(f"POEM keeps poem_keep = {keep} of {len(pool)} auxiliary outliers; it must lie in "
                             f"[1, {len(pool)}]")
        if buffer < 1:
            raise ValueError(f"POEM's regression buffers poem_buffer = {buffer} epochs of outliers; it must be >= 1")
        self.network, self.head, self.conf, self.device = network, head, conf, device
        self.inputs, self.pool = inputs, pool  # plain attributes: not part of the state
        self.register_buffer("selected", torch.zeros(buffer, keep, dtype=torch.long))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.network(inputs)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the head's input, flattened) in eval mode, on the CPU."""
        self.network.eval()
        parts = []
        with capture_outputs(self.network, self.head, ()) as captured:
            for start in range(0, len(images), FEATURE_BATCH):
                self.network(images[start:start + FEATURE_BATCH].to(self.device))
                parts.append(captured["features"].cpu())
        return torch.cat(parts)


def poem_buffered(model: PosteriorSampling, epoch: int) -> torch.Tensor:
    """The pool rows POEM's regression uses at the start of ``epoch``: the choices of the last
    min(epoch, buffer) epochs (row e mod buffer of ``selected`` holds epoch e's), in row order."""
    return model.selected[:min(epoch, len(model.selected))].flatten().cpu()


def poem_selection(model: PosteriorSampling, epoch: int, generator: torch.Generator) -> torch.Tensor:
    """This epoch's outliers (rows of the pool) by Thompson sampling (see ``PosteriorSampling``)."""
    pool = model.features(model.pool)
    dim = pool.shape[1]
    buffered, keep = poem_buffered(model, epoch), model.selected.shape[1]
    if not len(buffered):  # no data yet: the prior N(0, sigma I)
        mu, covariance = torch.zeros(dim, dtype=torch.float64), POEM_SIGMA * torch.eye(dim, dtype=torch.float64)
    else:
        count, epochs = len(buffered), len(buffered) // keep
        rows = torch.randint(len(model.inputs), (keep,), generator=generator)
        features = torch.cat([model.features(model.inputs[rows]).repeat(epochs, 1), pool[buffered]])
        targets = torch.cat([torch.full((count,), -model.conf), torch.full((count,), model.conf)]).double()
        noise = math.sqrt(POEM_SIGMA_N) * torch.randn(2 * count, generator=generator, dtype=torch.float64)
        mu, covariance = bayesian_posterior(features, targets + noise)
    chosen = boundary_outliers(pool, thompson_sample(mu, covariance, generator), keep)
    model.selected[epoch % len(model.selected)].copy_(chosen)
    return chosen


def _zeta_batches(inputs: torch.Tensor, labels: torch.Tensor, augmentation: str, seed: int, device: str,
                  fill: torch.Tensor | None = None):
    """The training set in batches of ``ZETA_BATCH`` with the recipe's augmentation (and crop padding
    ``fill``), as the UM code's estimate_loss runs over its augmented train loader."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(inputs), ZETA_BATCH):
        rows = slice(start, start + ZETA_BATCH)
        yield augment(inputs[rows], augmentation, generator, fill).to(device), labels[rows].to(device)


def finetune_backbone(name: str, base: Backbone, recipe: FineTuneRecipe, train_set: ImageSet, *, num_classes: int,
                      seed: int, weights_dir: Path, test_set: ImageSet | None = None,
                      outlier_set: ImageSet | None = None, device: str = "cpu", progress: bool = True,
                      compute: bool = True) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Fine-tune ``base`` by ``recipe`` (or load the cached result); return (state_dict, record), or
    None when it is not cached and ``compute`` is false.

    The record adds to ``train_epochs``'s the base backbone's key, zeta (given or estimated, with
    the mask fraction) and, for POEM, ``poem_keep`` (the outliers chosen per epoch: by default 1/8 of
    the pool, ``FineTuneRecipe.poem_kept``). ``base`` itself is left untouched (its model is copied).
    """
    final = finetune_path(weights_dir, name, base, recipe, train_set, outlier_set, num_classes, seed)
    saved = cached_weights(final)
    if saved is not None or not compute:
        return saved
    if (outlier_set is None) != (recipe.objective == "ce"):
        raise ValueError(f"fine-tuning {name}: objective {recipe.objective!r} and outlier set "
                         f"{outlier_set.name if outlier_set is not None else None} do not go together")
    preprocess = base.preprocessing
    inputs, labels = preprocess(train_set.images), class_labels(train_set, num_classes)
    fill = padding_fill(recipe, preprocess)  # the crops' border: black or the mean colour (recipe.crop_padding)
    model = copy.deepcopy(base.model).to(device)
    record = {"base": base.key, "base_name": base.name, "train_set": train_set.fingerprint(),
              "outlier_set": outlier_set.fingerprint() if outlier_set is not None else None, "label": recipe.label}
    zeta = None
    if recipe.forget != "none":
        zeta = recipe.zeta
        if zeta is None:
            zeta = estimate_zeta(model, recipe.delta, seed, _zeta_batches(inputs, labels, recipe.augmentation, seed,
                                                                          device, fill))
            log.info("%s: zeta = %.4f (mean CE of the frozen model with %.1f%% of every layer kept, seed %d)",
                     name, zeta, 100 * recipe.delta, seed)
        record.update({"zeta": zeta, "zeta_estimated": recipe.zeta is None, "delta": recipe.delta})
    torch.manual_seed(seed)
    if recipe.forget == "umap":
        network = PopupNetwork(model, recipe.keep, seed, recipe.bn_stats)
        trainable, export = list(network.scores.parameters()), PopupNetwork.effective_state
    else:
        network, trainable, export = model, list(model.parameters()), cpu_state
    outliers = preprocess(outlier_set.images) if outlier_set is not None else None

    def loss(model, x, y, outliers):
        if outliers is None:
            logits = model(x)
            return id_loss(logits, y, zeta), logits
        logits = model(torch.cat([x, outliers]))  # one train-mode pass: batch norm sees both
        id_logits, outlier_logits = logits[:len(x)], logits[len(x):]
        if recipe.objective == "oe":
            return oe_loss(id_logits, y, outlier_logits, recipe.oe_weight, zeta), id_logits
        return energy_bounded_loss(id_logits, y, outlier_logits, recipe.energy_weight, recipe.m_in, recipe.m_out,
                                   zeta), id_logits  # energy, and POEM on its chosen outliers

    step, before_epoch = gradient_step(loss), None
    if recipe.objective == "doe":
        warmup_steps = recipe.doe_warmup * math.ceil(len(inputs) / recipe.batch_size)  # train_epochs' steps per epoch
        network = DiversifiedOutlierExposure(network, trainable, zeta=zeta, warmup_steps=warmup_steps, seed=seed)
        step = doe_step
    elif recipe.objective == "poem":
        head = dict(model.named_modules())[base.head]
        keep = recipe.poem_kept(len(outliers))
        network = PosteriorSampling(network, next(n for n, m in network.named_modules() if m is head), inputs,
                                    outliers, keep=keep, conf=recipe.poem_conf, device=device,
                                    buffer=recipe.poem_buffer)
        before_epoch = poem_selection
        record["poem_keep"] = keep
    if recipe.objective in ("doe", "poem"):  # export the network without the objective's state
        def export(wrapper, unwrapped=export):
            return unwrapped(wrapper.network)

    return train_epochs(network, trainable, recipe, inputs, labels, seed=seed, final=final,
                        describe=f"fine-tune {name} ({recipe.label}) seed {seed}", step=step,
                        test=test_tensors(preprocess, test_set, device), outliers=outliers,
                        outlier_batch_size=recipe.outlier_batch_size, before_epoch=before_epoch, record=record,
                        export=export, fill=fill, device=device, progress=progress)
