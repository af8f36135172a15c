"""The search loop: one step, the run over epochs and its result (for one seed, or several as rows)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..artifacts.checkpoints import Checkpoint
from ..data.splits import Split, iterate_batches
from ..device.distributed import all_sum, average_over_ranks, rank_and_world, shard
from ..device.runtime import UniformNoise, generator
from ..device.virtual_ranks import RankLayout, padded_size
from ..nets.masks import prunable_parameters, unflatten
from ..train.epochs import EpochLoop
from ..train.loop import check_finite, to_layout
from ..train.memory import MicroBatches, plan_micro_batches
from ..train.recipe import TrainRecipe
from .balance import BUDGET_SLACK, GradBalance, Lagrangian, make_balancer, row_sum
from .config import LR_DROP_FACTOR, SearchConfig
from .forwards import batch_statistics, check_stacked, masked_forward
from .objectives import Objective
from .rank_rows import (
    RankRows,
    ReplayedNoise,
    draw_rank_noise,
    objective_and_rank_gradients,
    rank_rows_hold,
)
from .relaxation import ConcreteMask
from .seed_rows import SeedRows, SeedRowsDeclined, seed_rows_decline

logger = logging.getLogger(__name__)


def search_step(
    model: nn.Module,
    relaxation: ConcreteMask,
    objective: Objective,
    balancer: GradBalance | Lagrangian,
    optimizer: torch.optim.Optimizer,
    noise: UniformNoise | Sequence[UniformNoise],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_scale: float = 1.0,
    share: float | None = None,
    world: int = 1,
    ranks: RankLayout | None = None,
    micro_batches: MicroBatches | None = None,
    rank_rows: RankRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the search (inside :func:`batch_statistics`); returns the objective (unscaled)
    and ``Σσ(s)``, per row when batched.

    One noise draw per weight for the whole batch (and every row), the teacher forward once and
    without autograd, the masked forward on views of ``θ ⊙ m̃``, the gradient of
    ``loss_scale × objective`` to the logits only, GradBalance, one Adam step.

    With ``ranks`` of N > 1 recipe ranks (:mod:`..device.virtual_ranks`), ``noise`` holds one stream per
    chunk this process plays, and each chunk gets its own draw and its own forwards; the gradients
    are averaged over the N ranks, and GradBalance averages their λ*, as the authors' code does on
    N GPUs. ``x`` is then the global batch (or this process's part of it, when presharded), and the
    objective returned is this process's mean over its chunks. Otherwise, under DDP, ``x`` is this
    process's slice and ``share`` its weight (:func:`..device.distributed.shard`). ``micro_batches``
    (:mod:`..train.memory`) cuts each chunk's forwards into pieces that fit the device, under the same
    noise draw. With ``rank_rows`` active, the chunks run as rows of one stacked pass (:mod:`.rank_rows`),
    the same step to float rounding; an out-of-memory error there turns it off for good and repeats
    the step one chunk after another, with the noise already drawn.
    """
    ranks = ranks or RankLayout()
    noises = list(noise) if isinstance(noise, Sequence) else [noise]
    if len(noises) != ranks.per_process:
        raise ValueError(f"search_step: {ranks.per_process} chunks of the batch but {len(noises)} noise streams")
    by_rank = None
    if rank_rows is not None and rank_rows.active:
        uniform = draw_rank_noise(relaxation, noises)
        by_rank = rank_rows.run(lambda: objective_and_rank_gradients(model, relaxation, objective, uniform, x, y,
                                                                    ranks, loss_scale))
        if by_rank is None:  # out of memory: one chunk after another, with the same draws
            noises = [ReplayedNoise(u) for u in uniform]
    parts = None
    if by_rank is None:
        parts = [_objective_and_gradient(model, relaxation, objective, chunk_noise, x_part, y_part, loss_scale,
                                         micro_batches)
                 for chunk_noise, (x_part, y_part) in zip(noises, ranks.chunks(x, y), strict=True)]
    rank_norms = None
    if ranks.plain:
        loss, task_grad = parts[0]
        if world > 1:  # under DDP (core/device/distributed.py) ``x`` is this rank's slice: to the global batch's
            task_grad = average_over_ranks(task_grad, share, world)
    else:
        if by_rank is None:
            by_rank = torch.stack([part[0] for part in parts]), torch.stack([part[1] for part in parts])
        loss, local_grads = by_rank[0].mean(0), by_rank[1]
        task_grad = local_grads.sum(0)
        all_sum(task_grad)
        task_grad = task_grad / ranks.ranks
        # Each rank's ‖g_task‖ (per row when batched), gathered: λ* is taken per rank, then averaged.
        rank_norms = ranks.gather(torch.linalg.vector_norm(local_grads, dim=-1, keepdim=relaxation.batched))
    grad, expected = balancer.combine(relaxation.logits.detach(), task_grad, rank_norms)
    relaxation.logits.grad = grad
    optimizer.step()
    return loss, expected


def _objective_and_gradient(model: nn.Module, relaxation: ConcreteMask, objective: Objective, noise: UniformNoise,
                            x: torch.Tensor, y: torch.Tensor, loss_scale: float,
                            micro_batches: MicroBatches | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One noise draw, the objective on ``(x, y)`` (per row when batched, detached) and the
    gradient of ``loss_scale × objective`` with respect to the logits.

    Whole, one backward from the objective to the logits. In ``micro_batches`` of the batch
    (:mod:`..train.memory`), the gradient is taken piece by piece to a detached copy of the soft mask,
    each piece's mean weighted by its share of the samples, then once through the sigmoid to the
    logits. The noise is drawn once, before: an out-of-memory error part-way through rebuilds the
    soft mask from the same noise and repeats the step in more pieces, so it computes the same.
    """
    soft = relaxation.sample(noise)
    if micro_batches is None:
        return _whole_batch_gradient(model, relaxation, objective, soft, x, y, loss_scale)
    fresh = [soft]  # the first attempt's soft mask, until it is used

    def attempt(pieces: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A failed backward may have freed the first soft mask's graph: rebuild it, same noise.
        current = fresh.pop() if fresh else relaxation.soft_from_last_noise()
        if pieces == 1:
            return _whole_batch_gradient(model, relaxation, objective, current, x, y, loss_scale)
        soft_leaf = current.detach().requires_grad_(True)
        loss, soft_grad = _gradient_to_mask(model, relaxation, objective, soft_leaf, x, y, loss_scale, pieces)
        (task_grad,) = torch.autograd.grad(current, relaxation.logits, soft_grad)
        return loss, task_grad

    return micro_batches.run(attempt)


def _whole_batch_gradient(model: nn.Module, relaxation: ConcreteMask, objective: Objective, soft: torch.Tensor,
                          x: torch.Tensor, y: torch.Tensor, loss_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    loss = _objective(model, relaxation, objective, soft, x, y)
    # Rows are independent, so the gradient of their sum is each row's own gradient.
    (task_grad,) = torch.autograd.grad(loss.sum() * loss_scale, relaxation.logits)
    return loss.detach(), task_grad


def _gradient_to_mask(model: nn.Module, relaxation: ConcreteMask, objective: Objective, soft: torch.Tensor,
                      x: torch.Tensor, y: torch.Tensor, loss_scale: float,
                      pieces: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective on ``(x, y)`` and the gradient of ``loss_scale × objective`` to the soft mask
    (a leaf), over ``pieces`` micro-batches (objectives that are batch means only)."""
    if not objective.batch_mean:
        raise ValueError(f"the {objective.fn.__name__} objective is not a mean over samples: it cannot run "
                         "in micro-batches")
    loss_total, grad_total = None, None
    for x_piece, y_piece in zip(torch.tensor_split(x, pieces), torch.tensor_split(y, pieces), strict=True):
        weight = x_piece.shape[0] / x.shape[0]
        loss = _objective(model, relaxation, objective, soft, x_piece, y_piece)
        (grad,) = torch.autograd.grad(loss.sum() * (loss_scale * weight), soft)
        loss = loss.detach() * weight
        loss_total = loss if loss_total is None else loss_total + loss
        grad_total = grad if grad_total is None else grad_total.add_(grad)
    return loss_total, grad_total


def _objective(model: nn.Module, relaxation: ConcreteMask, objective: Objective, soft: torch.Tensor,
               x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The objective of the network masked by ``soft`` on ``(x, y)``, per row when batched."""
    if objective.kind == "network":
        if relaxation.batched:
            raise ValueError("network objectives (feature_mse, grad_mse, gradnorm) search one density at a time")
        return objective.fn(model, relaxation, soft, x, y)
    dense_logits = None
    if objective.needs_teacher:
        with torch.no_grad():
            dense_logits = model(x)
    sparse_logits = masked_forward(model, relaxation, soft, x)
    if relaxation.batched:
        return torch.vmap(lambda s: objective.fn(s, dense_logits, y))(sparse_logits)
    return objective.fn(sparse_logits, dense_logits, y)


def _micro_batches(model: nn.Module, relaxation: ConcreteMask, objective: Objective, x: torch.Tensor,
                   y: torch.Tensor, loss_scale: float, chunk: int, seed: int, stage: str) -> MicroBatches:
    """The search's micro-batching: planned from a probe step on a few samples of the first batch
    (CUDA), doubled on an out-of-memory error; objectives that are not batch means run whole.
    ``chunk``: the samples one step's forwards take at once: a recipe rank's chunk, so with
    ``virtual_ranks: N`` the ranks themselves are the authors' per-GPU batches, and only a chunk
    that does not fit is cut further (on a BatchNorm model that changes the gradient: a warning)."""
    limit = max(1, chunk // 2) if objective.batch_mean else 1
    # The search normalises with batch statistics (batch_statistics): pieces of a chunk change them.
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    probe = _memory_probe(model, relaxation, objective, x, y, loss_scale, seed)
    planned = plan_micro_batches(x.device, chunk, probe, stage, batchnorm=batchnorm) if limit > 1 else 1
    return MicroBatches(planned, limit=limit, stage=stage, batchnorm=batchnorm, batch=chunk)


def _memory_probe(model: nn.Module, relaxation: ConcreteMask, objective: Objective, x: torch.Tensor,
                  y: torch.Tensor, loss_scale: float, seed: int) -> Callable[[int], None]:
    """A step's forwards and backward on the batch's first ``n`` samples, on noise of its own."""
    probe_noise = UniformNoise(x.device, seed, "memory-probe", 0)

    def probe(samples: int) -> None:
        _objective_and_gradient(model, relaxation, objective, probe_noise, x[:samples], y[:samples], loss_scale)

    return probe


@contextmanager
def frozen_for_search(model: nn.Module, channels_last: bool):
    """The model's weights frozen (only the logits learn) and, with ``channels_last``, in NHWC,
    for the duration of a search or a probe; both restored on the way out, whatever happens."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        if channels_last:
            model.to(memory_format=torch.contiguous_format)


@dataclass
class SearchResult:
    scores: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    budget: float = 0.0
    peak_expected_over_budget: float = 0.0
    final_expected_over_budget: float = 0.0
    resumed_at: int | None = None
    shared_by: int = 1  # how many densities searched together in one batched search
    forward_path: str = "single"  # how its rows ran: single (one density), stacked or vmap (forwards.py)
    micro_batches: int = 1  # the pieces each batch ran in, to fit device memory (core/train/memory.py)
    ranks_as_rows: bool = False  # the virtual ranks ran as rows of one pass to the end (rank_rows.py)

    @property
    def group_seconds(self) -> float:
        """Wall-clock of all search epochs, across resumes (of the whole batch when batched)."""
        return sum(r["seconds"] for r in self.history)

    @property
    def seconds(self) -> float:
        """This ticket's share of the search's wall-clock: the whole of it, or 1/K of a batch of K."""
        return self.group_seconds / self.shared_by


def _layer_diagnostics(relaxation: ConcreteMask, row: int | None) -> dict[str, dict[str, float]]:
    """Per layer: the expected kept count ``Σσ(s)`` and the median ``|gradient|`` handed to Adam."""
    logits = relaxation.logits.detach()
    grad = relaxation.logits.grad
    if row is not None:
        logits, grad = logits[row], grad[row]
    kept = unflatten(torch.sigmoid(logits), relaxation.shapes)
    grads = unflatten(grad.abs(), relaxation.shapes)
    return {name: {"expected_kept": kept[name].sum().item(), "grad_median": grads[name].median().item()}
            for name in relaxation.shapes}


def concrete_search(
    model: nn.Module,
    train_split: Split,
    *,
    density: float | Sequence[float],
    config: SearchConfig,
    recipe: TrainRecipe,
    seed: int | Sequence[int],
    starts: Sequence[Mapping[str, torch.Tensor]] | None = None,
    stage: str = "search",
    checkpoint: Checkpoint | None = None,
    channels_last: bool = False,
    progress: bool = True,
    diagnostics: bool = False,
    rank_passes: str = "auto",
) -> SearchResult | list[SearchResult] | list[list[SearchResult]]:
    """Learn mask logits for ``model``'s current weights (``θ_k``), which stay frozen.

    ``density`` is one density, or a sequence of densities searched together as one batched
    search (one :class:`SearchResult` per density, in order). A batched search shares the teacher
    forward, the noise draw and the data order, and vectorises the masked forwards; its rows are
    the single searches at those densities (same seed) up to float rounding. Network objectives
    cannot be vectorised and run one density after another.

    ``model`` and ``train_split`` must be on the same device. The data are the training split with
    evaluation transforms (no augmentation), shuffled, at the training batch size. Returns the
    logits per layer; :func:`cts_pipeline.core.nets.masks.global_topk_mask` turns them into the mask.
    With ``checkpoint``, the search state is saved after every epoch and a matching one resumed;
    data order and noise of epoch ``e`` depend only on ``(seed, e)``, so resuming changes nothing.
    ``channels_last`` runs the convolutions in NHWC (1.8x faster ResNet-20 search steps on CPU).
    ``diagnostics`` adds per-layer expected kept counts and median gradient magnitudes to every
    epoch's record (one sort per layer per epoch). ``rank_passes``: how a process plays the recipe's
    virtual ranks (:data:`..device.virtual_ranks.RANK_PASSES`): as rows of one pass (:mod:`.rank_rows`)
    or one after another.

    Several seeds (``seed`` a sequence, ``starts`` each seed's state, e.g. its θ_k): their searches
    at every density run as rows of one (:mod:`.seed_rows`), each seed on its own weights, noise and
    data order; returns one list of results per seed, each as its own batched search would, up to
    float rounding. A ``ValueError`` says why where they cannot (:func:`.seed_rows.seed_rows_decline`).
    """
    if not isinstance(seed, int):
        return _search_seed_rows(model, train_split, density, config, recipe, list(seed), starts, stage=stage,
                                 checkpoint=checkpoint, channels_last=channels_last, progress=progress,
                                 diagnostics=diagnostics)
    batched = isinstance(density, Sequence)
    densities = _checked_densities(density)
    if batched and config.resolved_objective.kind == "network":
        return [concrete_search(model, train_split, density=k, config=config, recipe=recipe, seed=seed,
                                stage=f"{stage} {k:g}", checkpoint=None, channels_last=channels_last,
                                progress=progress, diagnostics=diagnostics, rank_passes=rank_passes)
                for k in densities]
    # The weights stay frozen and, with channels_last, in NHWC only while the search runs: restored
    # however it ends (an error, an interrupt), so the caller's model is as it was.
    with frozen_for_search(model, channels_last):
        run = _SearchRun.set_up(model, train_split, densities, batched, config, recipe, seed=seed, stage=stage,
                                channels_last=channels_last, diagnostics=diagnostics, rank_passes=rank_passes)
        results = _epochs(run, checkpoint, progress)
    return results if batched else results[0]


def _epochs(run: _SearchRun, checkpoint: Checkpoint | None, progress: bool) -> list[SearchResult]:
    """The search's epochs, resumed from ``checkpoint`` where it matches; each row's result."""
    loop = EpochLoop(run.stage, first=0, end=run.epochs, total=run.epochs, checkpoint=checkpoint, progress=progress)
    run.resume_at(loop.resume(run.restore))
    with batch_statistics(run.model):
        for epoch in loop:
            step_losses, under_steps = run.search_epoch(epoch)
            loop.end_epoch(epoch, run.state, run.record_epoch(epoch, step_losses, under_steps, loop.seconds()))
    results = run.results()
    loop.finish()
    return results


def _search_seed_rows(model: nn.Module, train_split: Split, density: float | Sequence[float], config: SearchConfig,
                      recipe: TrainRecipe, seeds: list[int], starts: Sequence[Mapping[str, torch.Tensor]] | None,
                      **options) -> list[list[SearchResult]]:
    """Several seeds' searches as rows of one (:func:`concrete_search` with a sequence of seeds)."""
    densities = _checked_densities(density)
    if starts is None or len(starts) != len(seeds):
        raise ValueError(f"concrete_search: {len(seeds)} seeds need as many start states, got "
                         f"{'none' if starts is None else len(starts)}")
    rank, world = rank_and_world()
    layout = RankLayout(recipe.virtual_ranks, rank, world, presharded=train_split.streamed)
    why = seed_rows_decline(model, config.resolved_objective, layout)
    if why is not None:
        raise SeedRowsDeclined(f"{options['stage']}: the seeds cannot search as rows: {why}")
    with frozen_for_search(model, options["channels_last"]):
        run = _SearchRun.set_up(model, train_split, densities * len(seeds), True, config, recipe, seed=seeds[0],
                                seed_rows=SeedRows(model, starts, train_split.device, densities=len(densities),
                                                   ranks=layout.per_process), seeds=seeds,
                                stage=options["stage"], channels_last=options["channels_last"],
                                diagnostics=options["diagnostics"], rank_passes="sequential")
        results = _epochs(run, options["checkpoint"], options["progress"])
    per_seed = len(densities)
    return [results[s * per_seed:(s + 1) * per_seed] for s in range(len(seeds))]


def _checked_densities(density: float | Sequence[float]) -> list[float]:
    densities = [float(k) for k in density] if isinstance(density, Sequence) else [float(density)]
    if not densities:
        raise ValueError("density: an empty sequence of densities")
    for k in densities:
        if not 0.0 < k < 1.0:
            raise ValueError(f"density must be in (0, 1), got {k!r}")
    return densities


@dataclass
class _SearchRun:
    """One search's state (the relaxation, the balancer, Adam, the per-step trace) and its step.
    ``batched``: K densities as rows of one search, each with its own history."""

    model: nn.Module
    train_split: Split
    densities: list[float]
    batched: bool
    config: SearchConfig
    recipe: TrainRecipe
    seed: int
    stage: str
    channels_last: bool
    diagnostics: bool
    rank_passes: str  # runtime.virtual_rank_passes: whether the ranks may run as rows
    objective: Objective
    loss_scale: float
    epochs: int
    drop_step: int  # the step at which the learning rates drop (config.lr_drop_step)
    relaxation: ConcreteMask
    balancer: GradBalance | Lagrangian
    optimizer: torch.optim.Adam
    ranks: RankLayout
    steps_per_epoch: int
    expected_trace: torch.Tensor  # Σσ(s) after every step (per row when batched)
    histories: list[list[dict]]
    step: int = 0
    resumed_at: int | None = None
    micro_batches: MicroBatches | None = None  # planned at the first step
    rank_rows: RankRows | None = None  # decided at the first step
    stacked_checked: bool = False
    seed_rows: SeedRows | None = None  # several seeds' searches as rows (seed_rows.py); densities then repeat
    seeds: list[int] | None = None  # their seeds, row s·K + k being seed s at density k

    @classmethod
    def set_up(cls, model: nn.Module, train_split: Split, densities: list[float], batched: bool,
               config: SearchConfig, recipe: TrainRecipe, **options) -> _SearchRun:
        device = train_split.device
        lr = config.lr if config.lr is not None else recipe.lr
        rank, world = rank_and_world()
        ranks = RankLayout(recipe.virtual_ranks, rank, world, presharded=train_split.streamed)
        steps_per_epoch = math.ceil(padded_size(len(train_split), ranks.parts) / recipe.batch_size)
        epochs = config.search_epochs(recipe.epochs)
        objective = config.resolved_objective
        target = densities if batched else densities[0]
        relaxation = ConcreteMask(prunable_parameters(model), target)
        return cls(
            model=model, train_split=train_split, densities=densities, batched=batched, config=config,
            recipe=recipe, objective=objective, loss_scale=config.effective_loss_scale, epochs=epochs,
            drop_step=config.lr_drop_step(epochs, steps_per_epoch), relaxation=relaxation, ranks=ranks, steps_per_epoch=steps_per_epoch,
            balancer=make_balancer(config.balance, target, relaxation.num_weights, lr,
                                   objective.lagrange_lr_factor),
            optimizer=torch.optim.Adam([relaxation.logits], lr=lr, fused=True),  # one kernel for all logits
            expected_trace=torch.zeros((epochs * steps_per_epoch, len(densities)) if batched
                                       else (epochs * steps_per_epoch,), device=device),
            histories=[[] for _ in densities], **options)

    @property
    def budgets(self) -> list[float]:
        return [BUDGET_SLACK * k * self.relaxation.num_weights for k in self.densities]

    def restore(self, saved: Mapping) -> bool:
        if tuple(saved["logits"].shape) != tuple(self.relaxation.logits.shape):
            logger.warning("%s: ignoring a checkpoint of another shape %s", self.stage, tuple(saved["logits"].shape))
            return False
        with torch.no_grad():
            self.relaxation.logits.copy_(saved["logits"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.balancer.load_state_dict(saved["balancer"], device=self.relaxation.logits.device)
        self.expected_trace[: saved["expected_trace"].shape[0]] = saved["expected_trace"].to(self.expected_trace.device)
        self.histories[:] = [list(h) for h in saved["history"]] if self.batched else [list(saved["history"])]
        return True

    def state(self) -> dict:
        return {
            "logits": self.relaxation.logits.detach(),
            "optimizer": self.optimizer.state_dict(),
            "balancer": self.balancer.state_dict(),
            "expected_trace": self.expected_trace[: self.step],
            "history": self.histories if self.batched else self.histories[0],
        }

    def resume_at(self, epochs_done: int | None) -> None:
        self.resumed_at = epochs_done
        self.step = (epochs_done or 0) * self.steps_per_epoch

    def search_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch of steps: each step's objective, and how many steps each row ended under budget."""
        device, rows, ranks = self.train_split.device, len(self.densities), self.ranks
        step_losses = torch.zeros((self.steps_per_epoch, rows) if self.batched else self.steps_per_epoch,
                                  device=device)
        under_steps = torch.zeros(rows if self.batched else (), device=device)
        if self.seed_rows is not None:
            # Each seed's stream and data order, exactly as its own search draws them.
            noise = [[UniformNoise(device, seed, "concrete-noise", epoch, *ranks.stream_suffix(c))
                      for c in range(ranks.per_process)] for seed in self.seeds]
            streams = [iterate_batches(self.train_split, self.recipe.batch_size, shuffle=True,
                                       generator=generator(device, seed, "search-order", epoch), parts=ranks.parts)
                       for seed in self.seeds]
            for i, batches in enumerate(zip(*streams, strict=True)):
                step_losses[i] = self._seed_rows_step(torch.stack([x for x, _ in batches]),
                                                      torch.stack([y for _, y in batches]), noise)
                under_steps += ~self.balancer.over_budget.reshape(under_steps.shape)
            check_finite(step_losses, stage=self.stage, epoch=epoch, epochs=self.epochs)
            return step_losses, under_steps
        # One stream per recipe rank this process plays; rank 0's is the plain search's.
        noise = [UniformNoise(device, self.seed, "concrete-noise", epoch, *ranks.stream_suffix(c))
                 for c in range(ranks.per_process)]
        batches = iterate_batches(self.train_split, self.recipe.batch_size, shuffle=True,
                                  generator=generator(device, self.seed, "search-order", epoch), parts=ranks.parts)
        for i, (x, y) in enumerate(batches):
            step_losses[i] = self._step(x, y, noise)
            under_steps += ~self.balancer.over_budget.reshape(under_steps.shape)
        all_sum(step_losses)  # the global batch's objective on every rank
        check_finite(step_losses, stage=self.stage, epoch=epoch, epochs=self.epochs)
        return step_losses, under_steps

    def _step(self, x: torch.Tensor, y: torch.Tensor, noise: list[UniformNoise]) -> torch.Tensor:
        """One search step on a global batch; this process's part of its objective."""
        ranks, world = self.ranks, self.ranks.processes
        share = 1.0  # with recipe ranks, every process plays the same number of them
        if world > 1 and ranks.plain:
            x, y, share = shard(x, y, ranks.process, world, presharded=self.train_split.streamed)
        x = to_layout(x, self.channels_last)
        self._first_step_checks(x, y)
        self._drop_lr_when_due()
        loss, expected = search_step(self.model, self.relaxation, self.objective, self.balancer, self.optimizer,
                                     noise, x, y, self.loss_scale, share, world,
                                     ranks, self.micro_batches, self.rank_rows)
        self.expected_trace[self.step] = expected.reshape(-1) if self.batched else expected
        self.step += 1
        return loss if world == 1 else loss * (share / world)

    def _drop_lr_when_due(self) -> None:
        if self.step == self.drop_step:
            for group in self.optimizer.param_groups:
                group["lr"] *= LR_DROP_FACTOR
            self.balancer.drop_lr(LR_DROP_FACTOR)

    def _seed_rows_step(self, xs: torch.Tensor, ys: torch.Tensor, noise: list[list[UniformNoise]]) -> torch.Tensor:
        """One step of every seed's rows (:mod:`.seed_rows`) on the seeds' batches ``xs``/``ys``
        (``[S, B, …]``): the seeds' (and ranks') draws, one pass, GradBalance per row, one Adam
        step; each row's objective (its ranks' mean)."""
        relaxation = self.relaxation
        if not self.stacked_checked:  # the layout's check, as for one seed's rows (on the first seed's batch)
            relaxation.stacked = check_stacked(self.model, relaxation, to_layout(xs[0], self.channels_last), self.stage)
            self.stacked_checked = True
            if not relaxation.stacked:
                raise SeedRowsDeclined(f"{self.stage}: the seeds cannot search as rows: the stacked layout differs "
                                       "from vmap on this model")
        self._drop_lr_when_due()
        seeds, ranks = len(self.seeds), self.ranks.per_process
        uniform = torch.empty((seeds, ranks, relaxation.num_weights), dtype=relaxation.theta.dtype,
                              device=relaxation.theta.device)
        for s, per_rank in enumerate(noise):
            for c, source in enumerate(per_rank):
                source.fill_(uniform[s, c])
        loss, gradients = self.seed_rows.objective_and_gradients(self.model, relaxation, self.objective, uniform, xs,
                                                                 ys, self.loss_scale, self.channels_last)
        task_grad = (gradients[:, 0] if ranks == 1 else gradients.sum(1) / ranks).flatten(0, 1)
        # Under virtual ranks, each rank's ‖g_task‖ per row: λ* is taken per rank, then averaged.
        rank_norms = None if ranks == 1 else \
            torch.linalg.vector_norm(gradients, dim=-1, keepdim=True).transpose(0, 1).flatten(1, 2)
        grad, expected = self.balancer.combine(relaxation.logits.detach(), task_grad, rank_norms)
        relaxation.logits.grad = grad
        self.optimizer.step()
        self.expected_trace[self.step] = expected.reshape(-1)
        self.step += 1
        return (loss[:, 0] if ranks == 1 else loss.mean(1)).flatten()

    def _first_step_checks(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """At the first step: whether the stacked forward holds for this model (batched), and
        how many pieces a batch must run in to fit the device."""
        if self.batched and not self.stacked_checked:
            self.relaxation.stacked = check_stacked(self.model, self.relaxation, x, self.stage)
            self.stacked_checked = True
        if self.micro_batches is None:
            chunk = len(self.ranks.chunks(x, y)[0][1])
            self.micro_batches = _micro_batches(
                self.model, self.relaxation, self.objective, x, y, self.loss_scale, chunk, self.seed, self.stage)
            self.rank_rows = RankRows(self._ranks_fit_as_rows(x, y, chunk), self.stage)

    def _ranks_fit_as_rows(self, x: torch.Tensor, y: torch.Tensor, chunk: int) -> bool:
        """Whether this process's ranks run as rows of one pass (:mod:`.rank_rows`): where
        ``rank_passes`` asks for one pass, for an objective on the logits, on layers the stacked
        layout knows, and where the ranks' chunks fit the device at once, whole."""
        per_process = self.ranks.per_process
        if not (self.ranks.one_pass(self.rank_passes, x.device) and self.objective.kind != "network"
                and self.micro_batches.count == 1 and rank_rows_hold(self.model, self.relaxation, x, self.stage)):
            return False
        probe = _memory_probe(self.model, self.relaxation, self.objective, x, y, self.loss_scale, self.seed)
        return plan_micro_batches(x.device, chunk * per_process, probe, self.stage) == 1

    def record_epoch(self, epoch: int, step_losses: torch.Tensor, under_steps: torch.Tensor,
                     seconds: float) -> list[str]:
        """Each row's record of the epoch, appended to its history; the log lines saying it."""
        rows = len(self.densities)
        losses = step_losses.mean(0).reshape(-1).tolist()
        kept_now = self.expected_trace[self.step - 1].reshape(-1).tolist()
        multiplier = self.balancer.multiplier
        multipliers = multiplier.reshape(-1).tolist() if multiplier is not None else [0.0] * rows
        under = (under_steps / self.steps_per_epoch).reshape(-1).tolist()
        messages = []
        for r, budget in enumerate(self.budgets):
            record = {
                "epoch": epoch + 1,
                "lr": self.optimizer.param_groups[0]["lr"],
                "loss": losses[r],
                "expected_kept": kept_now[r],
                "expected_over_budget": kept_now[r] / budget,
                "multiplier": multipliers[r],
                "under_budget_fraction": under[r],  # steps with λ* = 0: the moving average only decays
                "seconds": seconds,  # the whole epoch's wall-clock, shared by the rows when batched
            }
            if self.diagnostics:
                record["layers"] = _layer_diagnostics(self.relaxation, r if self.batched else None)
            self.histories[r].append(record)
            seed = f" seed {self.seeds[r * len(self.seeds) // rows]}" if self.seeds else ""
            messages.append(
                f"{self.stage} epoch {epoch + 1}/{self.epochs}{seed}"
                f"{f' density {self.densities[r]:g}' if self.batched else ''}: "
                f"{self.config.objective} {record['loss']:.5f}, expected kept {record['expected_kept']:.0f} = "
                f"{record['expected_over_budget']:.3f} x budget, multiplier {record['multiplier']:.3g} "
                f"({seconds:.1f} s)")
        return messages

    def results(self) -> list[SearchResult]:
        """One result per row: its scores (the logits per layer), history and budget figures."""
        rows = len(self.densities)
        final_expected = row_sum(torch.sigmoid(self.relaxation.logits.detach())).reshape(-1).tolist()
        peaks = self.expected_trace.reshape(-1, rows).max(0).values.tolist()
        path = ("stacked" if self.relaxation.stacked else "vmap") if self.batched else "single"
        if self.seed_rows is not None:
            path = f"stacked x{len(self.seeds)} seeds"
        return [
            SearchResult(
                scores=self.relaxation.scores(r if self.batched else None),
                history=self.histories[r],
                steps=self.step,
                budget=budget,
                peak_expected_over_budget=max(peaks[r], final_expected[r]) / budget,
                final_expected_over_budget=final_expected[r] / budget,
                resumed_at=self.resumed_at,
                shared_by=rows,
                forward_path=path,
                micro_batches=self.micro_batches.count if self.micro_batches is not None else 1,
                ranks_as_rows=self.rank_rows is not None and self.rank_rows.active,
            )
            for r, budget in enumerate(self.budgets)
        ]
