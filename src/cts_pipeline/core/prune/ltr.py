"""Lottery ticket rewinding (LTR): iterative global magnitude pruning, the baseline for CTS.

Level 0 is the dense network trained to the end. Level ``L`` keeps the ``round(0.8**L · d)``
largest-magnitude weights of the network trained at level ``L - 1`` (one global ranking, no
per-layer quota), rewinds the survivors to ``θ_k`` and trains them again from epoch ``k`` to the
end, which gives the weights that rank level ``L + 1``. The masks are nested: a weight pruned once
stays pruned. The cost of a level-``L`` ticket is everything it took to find its mask: the dense
training plus the training of levels ``1 .. L - 1`` (its own retraining is the pipeline's shared
retraining step, as for every other method).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..artifacts.checkpoints import Checkpoint
from ..data.splits import Split
from ..device.distributed import rank_and_world
from ..nets.masks import Mask, global_topk_mask, kept_count, prunable_parameters
from ..train.loop import train
from ..train.recipe import TrainRecipe

logger = logging.getLogger(__name__)

PRUNE_FRACTION = 0.2  # 20 % of the remaining weights per level (Frankle et al.'s iterative grid)

# Sparsities in the configuration are written with 4 decimals (level 18 = 0.982, while
# 1 - 0.8**18 = 0.981986...): a level reaches a requested sparsity when it is within half of that
# last decimal of it.
SPARSITY_TOLERANCE = 5e-5


def level_density(level: int) -> float:
    """Fraction of prunable weights kept at ``level``: ``0.8 ** level`` (level 0 is dense)."""
    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        raise ValueError(f"an LTR level must be a non-negative integer, got {level!r}")
    return (1.0 - PRUNE_FRACTION) ** level


def level_for_sparsity(sparsity: float) -> int:
    """The first level whose sparsity ``1 - 0.8**L`` reaches ``sparsity``, up to 4-decimal rounding.

    0.982 -> 18, 0.9885 -> 20, 0.9926 -> 22, 0.9953 -> 24, 0.9981 -> 28. Four decimals tell the
    levels apart up to level 36 (99.97 %); beyond that neighbouring levels differ by less.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    level = 0
    while 1.0 - level_density(level) < sparsity - SPARSITY_TOLERANCE:
        level += 1
    return level


def magnitude_mask(
    weights: Mapping[str, torch.Tensor], density: float, *, within: Mask | None = None
) -> Mask:
    """Keep the ``round(density · d)`` largest ``|w|`` over all layers (global top-k, exact count).

    With ``within`` (the previous level's mask) only weights it keeps are ranked, so the new mask is
    a subset of it even when some kept weights are exactly zero and tie with the pruned ones.
    """
    if within is None:
        return global_topk_mask({n: w.detach().abs() for n, w in weights.items()}, density)
    available = sum(int(within[n].sum()) for n in weights)
    total = sum(w.numel() for w in weights.values())
    wanted = kept_count(density, total)
    if wanted > available:
        raise ValueError(f"cannot keep {wanted} weights within a mask that keeps only {available}")
    # |w| >= 0 for every candidate, so a score of -1 ranks every excluded weight below all of them.
    scores = {
        n: torch.where(within[n].to(w.device), w.detach().abs().float(), -1.0)
        for n, w in weights.items()
    }
    return global_topk_mask(scores, density)


@dataclass
class LevelRecord:
    """One pruning level: its mask's size, what training it cost, and the cost of finding it.

    ``seconds`` and ``test_accuracy`` are the level's own training (``0.0`` and ``None`` for the
    last level, which is not trained here); ``cumulative_seconds`` is the dense training plus the
    training of every earlier level: the time it took to find this level's mask.
    """

    level: int
    density: float
    kept: int
    seconds: float
    test_accuracy: float | None
    cumulative_seconds: float


def lottery_ticket_rewinding(
    make_model: Callable[[], nn.Module],
    dense_final: Mapping[str, torch.Tensor],
    train_split: Split,
    test_split: Split | None,
    recipe: TrainRecipe,
    *,
    seed: int,
    max_level: int,
    start_epoch: int,
    dense_seconds: float = 0.0,
    keep_levels: Collection[int] = (),
    checkpoint: Checkpoint | None = None,
    level_checkpoint: Callable[[int], Checkpoint | None] | None = None,
    stage: str = "ltr",
    progress: bool = True,
    sync_batchnorm: bool = False,
    rank_passes: str = "auto",
) -> tuple[dict[int, Mask], list[LevelRecord]]:
    """Prune iteratively from ``dense_final`` down to level ``max_level``.

    ``make_model()`` must return a fresh model on the training device holding the rewind weights
    ``θ_k``; ``dense_final`` holds the dense network trained to the end (a state dict, or just its
    prunable weights). Levels ``1 .. max_level - 1`` are trained from ``start_epoch`` with the
    recipe's schedule; the last level's mask needs no training here.

    Returns the masks of ``keep_levels`` (CPU tensors) and one :class:`LevelRecord` per level.
    With ``checkpoint``, the state after each finished level is saved and a matching one resumed;
    ``level_checkpoint(level)`` gives each level's training its own per-epoch checkpoint.
    ``sync_batchnorm`` and ``rank_passes`` as for :func:`..train.loop.train`.
    """
    if not isinstance(max_level, int) or max_level < 1:
        raise ValueError(f"max_level must be a positive integer, got {max_level!r}")
    unknown = sorted(set(keep_levels) - set(range(1, max_level + 1)))
    if unknown:
        raise ValueError(f"keep_levels {unknown} are not levels 1..{max_level}")

    names = list(prunable_parameters(make_model()))  # one throwaway build, to know what to rank
    done = _Progress(weights={n: dense_final[n] for n in names}, cumulative=float(dense_seconds))
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        done = _Progress.from_payload(saved)
        logger.info("ltr: resuming from the checkpoint after level %d/%d", done.levels_done, max_level)
    for level in range(done.levels_done + 1, max_level + 1):
        density = level_density(level)
        done.mask = {n: keep.cpu() for n, keep in magnitude_mask(done.weights, density, within=done.mask).items()}
        if level in keep_levels:
            done.kept_masks[level] = done.mask
        seconds, accuracy = 0.0, None
        if level < max_level:
            # Only a level's final accuracy is kept: evaluating every epoch would cost time for nothing.
            seconds, accuracy, done.weights = _train_level(
                make_model, names, done.mask, train_split, test_split, replace(recipe, eval_every=recipe.epochs),
                seed=seed, stage=f"{stage} level {level}/{max_level}", start_epoch=start_epoch,
                checkpoint=level_checkpoint(level) if level_checkpoint is not None else None,
                progress=progress, sync_batchnorm=sync_batchnorm, rank_passes=rank_passes)
        record = LevelRecord(level=level, density=density, kept=sum(int(keep.sum()) for keep in done.mask.values()),
                             seconds=seconds, test_accuracy=accuracy, cumulative_seconds=done.cumulative)
        done.records.append(record)
        logger.info(
            "%s level %d/%d: density %.6f (sparsity %.4f %%), %d kept, found after %.1f s%s",
            stage, level, max_level, density, 100.0 * (1.0 - density), record.kept, done.cumulative,
            "" if accuracy is None else f", trained to {accuracy:.2f} % in {seconds:.1f} s",
        )
        done.cumulative += seconds
        done.levels_done = level
        if checkpoint is not None and level < max_level and rank_and_world()[0] == 0:  # one writer
            checkpoint.save(done.payload())
    if checkpoint is not None:
        checkpoint.finish()
    return done.kept_masks, done.records


@dataclass
class _Progress:
    """What the levels done so far leave for the next: the mask and the weights to rank, the
    masks kept, the records, the wall-clock until now (and a checkpoint's payload of it)."""

    weights: dict[str, torch.Tensor]
    cumulative: float
    mask: Mask | None = None
    kept_masks: dict[int, Mask] = field(default_factory=dict)
    records: list[LevelRecord] = field(default_factory=list)
    levels_done: int = 0

    @classmethod
    def from_payload(cls, saved: Mapping) -> _Progress:
        return cls(weights=saved["weights"], cumulative=float(saved["cumulative"]), mask=saved["mask"],
                   kept_masks={int(k): v for k, v in saved["kept_masks"].items()},
                   records=[LevelRecord(**r) for r in saved["records"]], levels_done=int(saved["levels_done"]))

    def payload(self) -> dict:
        return {"levels_done": self.levels_done, "mask": self.mask, "weights": self.weights,
                "kept_masks": self.kept_masks, "records": [asdict(r) for r in self.records],
                "cumulative": self.cumulative}


def _train_level(make_model: Callable[[], nn.Module], names: list[str], mask: Mask, train_split: Split,
                 test_split: Split | None, recipe: TrainRecipe, **options
                 ) -> tuple[float, float | None, dict[str, torch.Tensor]]:
    """Retrain one level's ticket from the rewind point: its seconds, final test accuracy and
    trained prunable weights (what the next level ranks)."""
    model = make_model()
    result = train(model, train_split, test_split, recipe, mask=mask, **options)
    prunable = prunable_parameters(model)
    weights = {n: prunable[n].detach().clone() for n in names}
    del model  # free the device before the next level builds its own
    return result.seconds, result.final.get("test_accuracy"), weights
