"""The one-call API for notebooks and other code, no Kedro involved.

    from cts_pipeline import find_ticket, load_ticket

    ticket = find_ticket(model, inputs, labels, sparsity=0.9926)    # CTS-KL on your model and data
    tickets = find_ticket(model, loader, sparsity=[0.982, 0.9926])   # a DataLoader, several sparsities
    result = ticket.retrain(model, inputs, labels, test=(test_inputs, test_labels))  # mask ⊙ θ, trained
    loaded = load_ticket("data/07_model_output/.../ticket.safetensors/<version>/ticket.safetensors")
    loaded.model, loaded.mask, loaded.manifest
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .core.cts import SearchConfig, concrete_search
from .core.data.user_data import LoaderSplit, inputs_info, is_streamable, tensor_split
from .core.device.runtime import CudaPolicy
from .core.nets.masks import global_topk_mask, layer_report, prunable_parameters
from .core.prune.tickets import prune_with_mask
from .core.train.loop import TrainResult
from .core.train.recipe import TrainRecipe

# What Ticket.retrain trains with when no recipe is given: the default run's dense recipe, short.
RETRAIN_DEFAULTS = TrainRecipe(epochs=10, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=(),
                               rewind_epoch=0)


@dataclass
class Ticket:
    """A CTS mask for a model: ``mask[name]`` is True where the weight is kept."""

    mask: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    sparsity: float
    kept_weights: int
    layers: dict[str, dict[str, Any]]  # per searched layer: kept, total, density
    history: list[dict] = field(default_factory=list)  # per search epoch: objective, kept/budget, λ
    # Layers outside find_ticket's ``prunable``: whole in ``mask`` (all True), so the ticket applies
    # to and retrains the whole network; ``sparsity``, ``kept_weights`` and ``layers`` count the
    # searched layers only.
    dense_layers: tuple[str, ...] = ()

    def apply(self, model: nn.Module) -> nn.Module:
        """Prune ``model`` in place (``torch.nn.utils.prune.custom_from_mask``) and return it.

        The pruned network is not yet a ticket's result: retrain ``mask ⊙ θ_k`` (the pipeline's
        retraining) before you evaluate it; right after pruning it is near chance."""
        return prune_with_mask(model, self.mask)

    def retrain(self, model: nn.Module, data: torch.Tensor | Iterable, labels: torch.Tensor | None = None, *,
                test: tuple[torch.Tensor, torch.Tensor] | Iterable | None = None, recipe: TrainRecipe | None = None,
                seed: int = 0, progress: bool = False) -> TrainResult:
        """Retrain ``mask ⊙ model``'s current weights with the project's trainer, in place.

        Args:
            model: the network the mask was found on, at the weights to start from (``θ_k``).
                It is trained in place; pruned weights are zeroed first and after every step.
            data, labels: the training data, as for :func:`find_ticket` (tensors, or a DataLoader
                read batch by batch in every epoch, in its own order).
            test: ``(inputs, labels)`` or a DataLoader to evaluate on after the last epoch (read
                into memory); its accuracy is ``result.final["test_accuracy"]``.
            recipe: a :class:`~cts_pipeline.core.train.recipe.TrainRecipe` (SGD, schedule, epochs);
                default :data:`RETRAIN_DEFAULTS` (10 epochs, lr 0.1, momentum 0.9, weight decay 5e-4).
            seed: seeds the data order of tensor data.
            progress: show a progress bar over the epochs.

        Returns the :class:`~cts_pipeline.core.train.loop.TrainResult`: per-epoch ``history`` with
        the training loss and accuracy, and ``final["test_accuracy"]`` with ``test``.
        """
        from .core.train.loop import train

        if not isinstance(model, nn.Module):
            raise TypeError(f"Ticket.retrain: model must be a torch.nn.Module, got {type(model).__name__}")
        missing = sorted(set(self.mask) - set(dict(model.named_parameters())))
        if missing:
            raise ValueError(f"Ticket.retrain: the model has no parameter {', '.join(missing[:3])} of this ticket's "
                             "mask (give the network the ticket was found on, not one pruned by ticket.apply)")
        recipe = recipe if recipe is not None else RETRAIN_DEFAULTS
        device = next(model.parameters()).device
        CudaPolicy().apply(device)  # TF32 and cuDNN's autotuner as the pipeline trains
        train_split, batch_size = _user_split(model, data, labels, device)
        test_split = None
        if test is not None:
            test_inputs, test_labels = test if isinstance(test, tuple | list) else _as_tensors(test, None)
            test_split = tensor_split(torch.as_tensor(test_inputs), torch.as_tensor(test_labels),
                                      train_split.info.num_classes, device)
        recipe = replace(recipe, batch_size=batch_size or recipe.batch_size, eval_every=recipe.epochs)
        return train(model, train_split, test_split, recipe, seed=seed, stage="retrain", mask=self.mask,
                     progress=progress)

    def __repr__(self) -> str:
        """Short and readable: the sparsity, the kept count and each layer's density (the default
        dataclass repr printed every mask and score tensor)."""
        layers = ", ".join(f"{name} {r['kept']}/{r['total']} ({100 * r['density']:.2f} %)"
                           for name, r in self.layers.items())
        total = sum(r["total"] for r in self.layers.values())
        dense = f"; kept whole: {', '.join(self.dense_layers)}" if self.dense_layers else ""
        return (f"Ticket(sparsity {100 * self.sparsity:.2f} %, kept {self.kept_weights} of {total} weights; "
                f"{layers}{dense})")


def _as_tensors(data: Any, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if labels is not None:
        if not isinstance(data, torch.Tensor | list | tuple) or isinstance(data, str):
            raise TypeError(f"find_ticket: with labels, data must be a tensor of inputs, got {type(data).__name__}")
        return torch.as_tensor(data), torch.as_tensor(labels)
    if isinstance(data, Iterable) and not isinstance(data, torch.Tensor | str):  # a DataLoader of batches
        batches = [(x, y) for x, y in data]
        if not batches:
            raise ValueError("find_ticket: data (a DataLoader or iterable of (inputs, labels) batches) yielded "
                             "no batch; give it at least one sample")
        xs, ys = zip(*batches, strict=True)
        return torch.cat(xs), torch.cat(ys)
    raise TypeError("find_ticket: give inputs and labels tensors, or a DataLoader of (inputs, labels) batches; "
                    f"got data of type {type(data).__name__} and no labels")


def _user_split(model: nn.Module, data: Any, labels: torch.Tensor | None, device: torch.device):
    """``data`` as a split the loops read, checked against the model first; and the loader's batch
    size when it is streamed (None for tensors)."""
    if labels is None and is_streamable(data):
        first_inputs, first_labels = next(iter(data))
        classes = _check_inputs(model, torch.as_tensor(first_inputs), torch.as_tensor(first_labels))
        return LoaderSplit(data, inputs_info(tuple(first_inputs.shape[1:]), classes), device), data.batch_size
    inputs, targets = _as_tensors(data, labels)
    return tensor_split(inputs, targets, _check_inputs(model, inputs, targets), device), None


@contextmanager
def _only_prunable(model: nn.Module, prunable: Callable[[str, nn.Module], bool] | Sequence[str] | None
                   ) -> Iterator[None]:
    """Within the block, ``model``'s prunable weights are those ``prunable`` picks among its Conv
    and Linear layers (module names, or a predicate on ``(name, module)``): the others are kept
    dense through the model's ``keep_dense`` (restored after, whatever happens)."""
    if prunable is None:
        yield
        return
    layers = {name.rsplit(".", 1)[0] if "." in name else "": name for name in prunable_parameters(model)}
    modules = dict(model.named_modules())
    if callable(prunable):
        chosen = {m for m in layers if prunable(m, modules[m])}
    elif isinstance(prunable, Sequence) and not isinstance(prunable, str) and all(isinstance(n, str) for n in prunable):
        unknown = sorted(set(prunable) - set(layers))
        if unknown:
            raise ValueError(f"find_ticket: prunable names {', '.join(unknown[:4])}, which are not Conv or Linear "
                             f"layers of the model; its layers: {', '.join(list(layers)[:8])}")
        chosen = set(prunable)
    else:
        raise TypeError("find_ticket: prunable must be a list of module names or a function (name, module) -> bool, "
                        f"got {type(prunable).__name__}")
    if not chosen:
        raise ValueError("find_ticket: prunable selects no layer; the default is every Conv and Linear layer")
    had, before = hasattr(model, "keep_dense"), getattr(model, "keep_dense", ())
    model.keep_dense = (*before, *sorted(set(layers) - chosen))
    try:
        yield
    finally:
        if had:
            model.keep_dense = before
        else:
            del model.keep_dense


def _densities(sparsity: Any) -> list[float]:
    """``sparsity`` (a number, or a list of numbers, in (0, 1)) as densities, checked by name."""
    values = list(sparsity) if isinstance(sparsity, list | tuple) else [sparsity]
    if not values:
        raise ValueError("find_ticket: sparsity is an empty list; give a number in (0, 1), e.g. 0.9926")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"find_ticket: sparsity must be a number in (0, 1) or a list of them (0.9926 for "
                            f"99.26 %), got {value!r}")
        if not 0 < value < 1:
            raise ValueError(f"find_ticket: sparsity must be in (0, 1), e.g. 0.9926 for 99.26 %, got {value!r}")
    return [1.0 - float(v) for v in values]


def _check_inputs(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> int:
    """Refuse, before any compute, data the search could only fail on later (or, worse, run on);
    returns the number of classes the model predicts."""
    if len(images) == 0:
        raise ValueError("find_ticket: data holds no sample; give at least one")
    if targets.dim() != 1 or len(targets) != len(images):
        raise ValueError(f"find_ticket: labels must be one class index per input: data holds {len(images)} inputs, "
                         f"labels has shape {list(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"find_ticket: labels must be integer class indices (torch.long), got {targets.dtype}; "
                        "convert them with labels.long() if they are whole numbers")
    if images.dim() < 2:
        raise ValueError(f"find_ticket: inputs must be [N, ...] (one row per sample), got {list(images.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            out = model(images[:2].to(device, torch.float32))
    except Exception as exc:
        raise ValueError(f"find_ticket: the model does not take inputs of shape {list(images.shape[1:])}: "
                         f"{type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    if out.dim() != 2:
        raise ValueError(f"find_ticket: the model must return class scores [N, classes], got {list(out.shape)}")
    classes = out.shape[1]
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= classes:
        raise ValueError(f"find_ticket: labels must lie in [0, {classes}) for a model with {classes} outputs, "
                         f"got labels from {low} to {high}")
    return classes


def find_ticket(
    model: nn.Module,
    data: torch.Tensor | Iterable,
    labels: torch.Tensor | None = None,
    *,
    sparsity: float | list[float],
    objective: str = "kl",
    epochs: int = 10,
    batch_size: int = 128,
    lr: float | None = None,
    seed: int = 0,
    progress: bool = False,
    prunable: Callable[[str, nn.Module], bool] | Sequence[str] | None = None,
) -> Ticket | list[Ticket]:
    """Concrete Ticket Search on any ``nn.Module`` and data, at one sparsity or several.

    Args:
        model: the network whose weights the search keeps or drops, at the weights to search on
            (the rewind point ``θ_k``, or the initialisation). It is not changed.
        data: inputs ``[N, ...]`` of any shape the model takes (``[N, features]`` for an MLP,
            ``[N, C, H, W]`` for images), already normalised as the model expects, with ``labels``;
            or a DataLoader of ``(inputs, labels)`` batches, read batch by batch in every epoch (never
            gathered into memory; its own order and batch size; ``batch_size`` is then unused); or
            another iterable of batches, read once into memory.
        labels: integer class indices ``[N]`` in ``[0, classes)``, with a tensor ``data``.
        sparsity: the fraction of prunable weights removed, in (0, 1) (0.9926 for 99.26 %); a list
            runs one batched search and returns one Ticket per sparsity, in the same order.
        objective: the search objective (``kl``, CTS-KL, by default; ``ce``, ``fkl``, ``dloss``, …).
        epochs: passes over the data.
        batch_size: samples per search step.
        lr: Adam's rate for the logits (None: the method's default, 0.1).
        seed: seeds the data order and the Concrete noise.
        progress: show a progress bar over the search's epochs (off by default: a notebook's cell
            stays quiet).
        prunable: which layers may be pruned: a list of module names (``["features.0", "fc1"]``) or
            a function ``(name, module) -> bool``, among the Conv and Linear layers; the others stay
            dense. Default: every Conv and Linear layer, as in the pipeline.

    The prunable weights are those of every ``Conv2d`` and ``Linear`` layer (or ``prunable``'s);
    each mask keeps exactly ``round((1 − sparsity)·d)`` weights. A ticket is a mask, not a trained
    network: retrain ``mask ⊙ θ_k`` (the pipeline's ``retrain`` step) before using it. Bad input is
    refused before any compute with one ``ValueError`` or ``TypeError`` naming the argument.
    """
    densities = _densities(sparsity)
    batched = isinstance(sparsity, list | tuple)
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_ticket: model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_pruned(model)
    every_layer = prunable_parameters(model)
    if not every_layer:
        raise ValueError(f"find_ticket: model ({type(model).__name__}) has no Conv2d or Linear layer to prune")
    device = next(model.parameters()).device
    CudaPolicy().apply(device)  # TF32 and cuDNN's autotuner as the pipeline searches
    # Inputs are taken as they are, whatever their shape ([N, features], sequences, images).
    split, loader_batch = _user_split(model, data, labels, device)
    config = SearchConfig(objective=objective, epochs=epochs, lr=lr)
    recipe = TrainRecipe(epochs=max(epochs, 1), batch_size=loader_batch or batch_size, lr=0.1, milestones=[],
                         rewind_epoch=0)
    was_training = model.training
    try:
        with _only_prunable(model, prunable):
            found = concrete_search(model, split, density=densities if batched else densities[0], config=config,
                                    recipe=recipe, seed=seed, stage="find_ticket", progress=progress)
    finally:
        model.train(was_training)
    tickets = [_ticket(result, density, every_layer) for result, density in
               zip(found if isinstance(found, list) else [found], densities, strict=True)]
    return tickets if batched else tickets[0]


def _ticket(result, density: float, every_layer: dict[str, torch.Tensor]) -> Ticket:
    """The ticket of one search: its top-k mask over the searched layers, and the layers outside
    ``prunable`` kept whole, so the mask covers every layer the pipeline's trainer masks."""
    searched = global_topk_mask(result.scores, density)
    kept = sum(int(m.sum()) for m in searched.values())
    total = sum(m.numel() for m in searched.values())
    dense = tuple(name for name in every_layer if name not in searched)
    mask = {name: searched[name] if name in searched else torch.ones_like(weight, dtype=torch.bool, device="cpu")
            for name, weight in every_layer.items()}
    return Ticket(mask=mask, scores=result.scores, sparsity=1 - kept / total, kept_weights=kept,
                  layers=layer_report(searched), history=result.history, dense_layers=dense)


def _refuse_pruned(model: nn.Module) -> None:
    """One line for a model already pruned with ``torch.nn.utils.prune`` (``ticket.apply`` does
    that): its weights are then computed from ``weight_orig`` and a mask, and the search cannot
    learn a mask for them (it would fail deep inside with "does not require grad")."""
    from torch.nn.utils import prune

    pruned = [name or type(model).__name__ for name, module in model.named_modules()
              if any(isinstance(hook, prune.BasePruningMethod) for hook in module._forward_pre_hooks.values())]
    if pruned:
        raise ValueError(f"find_ticket: the model is already pruned with torch.nn.utils.prune (layers "
                         f"{', '.join(pruned[:4])}{', …' if len(pruned) > 4 else ''}); search the unpruned network, "
                         "or make the pruning permanent first with torch.nn.utils.prune.remove(module, 'weight')")


class LoadedTicket(NamedTuple):
    """What :func:`load_ticket` gives: the pruned network, its mask, and the manifest that says what
    it is (method, sparsity, test accuracy, model, dataset, seed, recipe's rewind epoch)."""

    model: nn.Module
    mask: dict[str, torch.Tensor]
    manifest: dict[str, Any]


def load_ticket(path: str | Path, *, weights: bool = True) -> LoadedTicket:
    """A ticket file (``ticket.safetensors``, written by every pipeline branch) as a network.

    Builds the model its manifest names, loads the retrained weights (``weights=False``: a fresh
    seeded initialisation instead, to retrain the mask elsewhere) and prunes it with the mask
    through ``torch.nn.utils.prune.custom_from_mask``. Returns ``LoadedTicket(model, mask,
    manifest)``: ``model, mask, manifest = load_ticket(path)``.

    Refuses, naming the file: a file that does not match the ``.record.json`` beside it (when
    there is one), a truncated or malformed file, and masks that disagree with the manifest
    (per-layer or total kept counts) or with the model it names (layers and shapes).
    """
    from .core.device.runtime import generator
    from .core.nets.registry import build_model
    from .core.nets.selection import select_prunable

    mask, state, manifest = _read_checked(Path(path))
    init = generator("cpu", manifest.get("seed", 0), "model-init")
    try:
        model = build_model(manifest["model"], image_shape=tuple(manifest["image_shape"]),
                            num_classes=manifest["num_classes"], generator=init, **manifest.get("model_options", {}))
        select_prunable(model, manifest.get("model_prunable"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: its manifest does not describe a model this project builds: {exc}") from None
    if weights:
        if not state:
            raise ValueError(f"{path}: the ticket holds no weights; load it with weights=False")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{path}: its weights do not fit the model its manifest names: "
                             f"{str(exc).splitlines()[0]}") from None
    try:
        return LoadedTicket(prune_with_mask(model, mask), mask, manifest)
    except ValueError as exc:
        raise ValueError(f"{path}: its mask does not fit the model its manifest names: {exc}") from None


def _read_checked(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """The ticket at ``path``, checked against its record and its own manifest."""
    import json

    from .core.artifacts.records import RECORD_SUFFIX, payload_mismatch
    from .core.prune.tickets import read_ticket

    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the ticket file: {exc.strerror or exc}") from None
    record_path = path.with_name(path.name + RECORD_SUFFIX)
    if record_path.exists():
        try:
            problem = payload_mismatch(payload, json.loads(record_path.read_text()))
        except ValueError:
            problem = f"its record {record_path.name} is not readable"
        if problem:
            raise ValueError(f"{path} does not match the record written with it: {problem}")
    try:
        mask, state, manifest = read_ticket(payload)
    except Exception as exc:  # safetensors' own errors (incomplete metadata, header too large, …)
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"{path} is not a complete ticket file: {type(exc).__name__}: {reason}"[:300]) from None
    if "model" not in manifest:
        raise ValueError(f"{path}: the ticket has no manifest naming its model")
    kept = {name: int(keep.sum()) for name, keep in mask.items()}
    stated = manifest.get("layer_kept")
    if stated is not None and stated != kept:
        differ = sorted(n for n in set(stated) | set(kept) if stated.get(n) != kept.get(n))
        raise ValueError(f"{path}: its masks disagree with its manifest: "
                         + ", ".join(f"{n} keeps {kept.get(n)} where the manifest says {stated.get(n)}"
                                     for n in differ[:4]))
    if "kept_weights" in manifest and manifest["kept_weights"] != sum(kept.values()):
        raise ValueError(f"{path}: its masks keep {sum(kept.values())} weights where its manifest says "
                         f"{manifest['kept_weights']}")
    return mask, state, manifest
