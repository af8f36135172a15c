"""Retrain K tickets of one network at once: same recipe, same seed, same start weights, K masks;
or train the rows of several seeds at once, each from its own weights on its own batches.

Tickets that share those see exactly the same batches (the data order and the augmentation depend
on the seed and the epoch only), so they can train as one network of K stacked copies
(:mod:`.stacked`): every parameter and BatchNorm statistic has a leading ``[K]`` dimension, one
forward computes all K, and the loss is the sum of the K tickets' losses, whose gradient with
respect to ticket ``k``'s parameters is ticket ``k``'s own. This is the ``stack_module_state``
pattern of ``torch.func``, with the stacked layout instead of ``vmap`` because it measured faster
on CPUs (see :mod:`.stacked`).

Per ticket, as in :func:`.loop.train`: its mask held at zero after every step, its own
gradient-norm clipping, its own BatchNorm running statistics, its own evaluation. SGD with
momentum and weight decay is elementwise, so one optimizer over the stacked tensors is K
optimizers. The result equals K runs of :func:`.loop.train` up to float rounding.

Seeds as rows (``runtime.stack_seeds``) are the same network with row ``k`` starting from its own
seed's weights and reading its own seed's batches: the rows' inputs then sit side by side in the
channel dimension (the stacked layout's per-row input), and the first layer is a grouped
convolution, or a batched product, like every other. A dense run is a row without a mask.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts.checkpoints import Checkpoint
from ..data.splits import Split, iterate_batches
from ..device.runtime import generator, seconds_per_step
from ..device.virtual_ranks import RankLayout, padded_size
from ..nets.masks import check_mask_matches
from .epochs import EpochLoop
from .loop import TrainResult, autocast_for, check_finite, effective_precision, to_layout, train
from .recipe import TrainRecipe
from .stacked import rewired, unstack
from .stacked import supports as stacked_supports

logger = logging.getLogger(__name__)


def supports(model: nn.Module, recipe: TrainRecipe, device: torch.device) -> bool:
    """Whether these tickets can train stacked: layers the stacked layout knows and BatchNorm with a
    fixed momentum. Virtual ranks train stacked in one pass (each rank's BatchNorm statistics its
    own, :func:`.stacked.rewired`)."""
    norms_ok = all(m.momentum is not None for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return stacked_supports(model) and norms_ok


def stacks_ranks(recipe: TrainRecipe, rank_passes: str, device: torch.device) -> bool:
    """Whether retraining may stack tickets under ``recipe``'s virtual ranks: stacked, they run in
    one pass, so only where ``rank_passes`` (``runtime.virtual_rank_passes``) chooses one pass on
    this device. With ``auto`` on a CPU the ranks run one after another, and so do the tickets
    (stacked, ResNet-20's 7 tickets under 4 ranks took 2.5x one at a time there: docs/performance.md)."""
    return recipe.virtual_ranks == 1 or RankLayout(recipe.virtual_ranks).one_pass(rank_passes, device)


def stacks_seeds(stack_seeds: bool | str, device: torch.device) -> bool:
    """Whether the grid's seeds share nodes, as rows of one stacked network (``runtime.stack_seeds``):
    ``true`` always; ``auto`` on an accelerator only, where the node then probes whether stacking is
    faster. A CPU is compute-bound, so there ``auto`` keeps a node per seed, which parallel runners
    (Dask, ``ParallelRunner``) can also spread over workers."""
    return stack_seeds is True or (stack_seeds == "auto" and device.type != "cpu")


class RowScaler:
    """fp16 loss scaling for K stacked tickets, one scale per ticket, as K GradScalers.

    Written here rather than taken from ``torch.amp.GradScaler`` because that keeps one scale and
    one found-inf flag for all parameters: an overflow in one ticket would skip every ticket's step
    and halve every scale, which K tickets trained one at a time would not do. Per ticket, this is
    GradScaler's rule with its defaults: the loss multiplied by the scale; the gradients divided by
    it; a ticket with a non-finite gradient keeps its weights and momentum (its step skipped) and
    halves its scale; 2000 finite steps in a row double it. Everything stays on the device: no
    host sync per step.
    """

    def __init__(self, rows: int, device: torch.device, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.scale = torch.full((rows,), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros(rows, dtype=torch.int32, device=device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def scaled(self, losses: torch.Tensor) -> torch.Tensor:
        """The K losses, each times its ticket's scale."""
        return losses * self.scale.to(losses.dtype)

    @torch.no_grad()
    def unscale_(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """Divide each ticket's gradients by its scale; return which tickets' gradients are all finite."""
        inverse = self.scale.double().reciprocal().float()  # as GradScaler.unscale_
        finite = torch.ones_like(self.scale, dtype=torch.bool)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(_per_row(inverse, p.grad))
                finite &= torch.isfinite(p.grad).reshape(p.grad.shape[0], -1).all(1)
        return finite

    @torch.no_grad()
    def step(self, optimizer: torch.optim.SGD, params: Sequence[torch.Tensor], finite: torch.Tensor) -> None:
        """``optimizer``'s SGD step for the tickets whose gradients are finite; the others' weights
        and momentum stay as they were. SGD's update is written out here, parameter by parameter,
        with each row switched on or off, rather than run whole and undone: undoing needs a copy of
        every stacked weight and momentum buffer per step (twice the tickets' state in memory). A
        buffer absent before the first step is made zero, which is what SGD's first step means
        (``buf = d_p`` without dampening)."""
        group = optimizer.param_groups[0]
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        if group["dampening"]:
            raise ValueError("RowScaler.step: SGD with dampening is not supported (the recipe has none)")
        for p in params:
            if p.grad is None:
                continue
            keep = _per_row(finite, p)
            d_p = p.grad.add(p, alpha=decay) if decay else p.grad
            if momentum:
                state = optimizer.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p)
                buf.copy_(torch.where(keep, buf * momentum + d_p, buf))
                d_p = d_p.add(buf, alpha=momentum) if group["nesterov"] else buf
            p.sub_(torch.where(keep, d_p, 0.0), alpha=lr)  # skipped rows: p − lr·0 = p exactly

    @torch.no_grad()
    def update(self, finite: torch.Tensor) -> None:
        """GradScaler.update per ticket (``torch._amp_update_scale_``'s rule)."""
        grown = self.growth_tracker + 1
        grow = finite & (grown == self.growth_interval)
        self.scale.copy_(torch.where(~finite, self.scale * self.backoff_factor,
                                     torch.where(grow, self.scale * self.growth_factor, self.scale)))
        self.growth_tracker.copy_(torch.where(finite & ~grow, grown, torch.zeros_like(grown)))

    def state_dict(self) -> dict:
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[K]`` values shaped to broadcast over a ``[K, ...]`` tensor."""
    return values.view(-1, *[1] * (like.dim() - 1))


class StackedTickets:
    """K copies of ``model``'s parameters and buffers, ``[K, *shape]`` each, on its device.

    With ``ranks`` P > 1 (virtual ranks), the running statistics live in ``[P, K, C]`` tensors
    (:attr:`rank_buffers`) whose first row is the tickets' own (:attr:`buffers`, rank 0's, as DDP
    keeps them); training normalises each rank's chunk apart and updates all P rows."""

    def __init__(self, model: nn.Module, rows: int, ranks: int = 1,
                 starts: Sequence[Mapping[str, torch.Tensor]] | None = None):
        if starts is not None and len(starts) != rows:
            raise ValueError(f"StackedTickets: {rows} rows but {len(starts)} start states")
        self.model, self.rows, self.ranks = model, rows, ranks

        def as_rows(name: str, own: torch.Tensor) -> torch.Tensor:
            """``[K, *shape]``: the model's own tensor in every row, or row k's from ``starts[k]``."""
            if starts is None:
                return own.detach().unsqueeze(0).repeat(rows, *[1] * own.dim())
            return torch.stack([start[name].to(own.device, own.dtype) for start in starts])

        self.params = {n: as_rows(n, p).requires_grad_(True) for n, p in model.named_parameters()}
        self.rank_buffers = {n: as_rows(n, b).expand(ranks, rows, *b.shape).contiguous()
                             for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))}
        self.buffers = {n: self.rank_buffers[n][0] if n in self.rank_buffers else as_rows(n, b).contiguous()
                        for n, b in model.named_buffers()}
        self._batch_counts = [b for n, b in self.buffers.items() if n.endswith("num_batches_tracked")]
        self._training_buffers = {**self.buffers, **self.rank_buffers}  # every rank's statistics

    def logits(self, x: torch.Tensor, *, training: bool) -> torch.Tensor:
        """``[K, B, classes]``; in training, BatchNorm uses batch statistics and updates each row's."""
        ranks = self.ranks if training else 1
        buffers = self._training_buffers if training else self.buffers
        with rewired(self.model, self.params, self.rows, buffers, training=training, ranks=ranks):
            out = unstack(self.model(x), self.rows)
        if training:
            for count in self._batch_counts:
                count.add_(1)
        return out

    def state_dict(self, row: int) -> dict[str, torch.Tensor]:
        """Ticket ``row``'s weights and buffers, keyed as ``model.state_dict()``, on the CPU."""
        state = {n: p[row].detach().to("cpu", copy=True).contiguous() for n, p in self.params.items()}
        state.update({n: b[row].to("cpu", copy=True).contiguous() for n, b in self.buffers.items()})
        return {k: state[k] for k in self.model.state_dict()}


@torch.inference_mode()
def evaluate_stacked(tickets: StackedTickets, split: Split, batch_size: int, *,
                     channels_last: bool = False, precision: str = "fp32") -> list[dict[str, float]]:
    """Accuracy (%) and mean cross-entropy of each ticket on ``split`` (BatchNorm running statistics),
    under the autocast of ``precision`` as :func:`.loop.evaluate`."""
    device = split.device
    autocast = autocast_for(precision, device)
    correct = torch.zeros(tickets.rows, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(tickets.rows, dtype=torch.float64, device=device)
    for x, y in iterate_batches(split, batch_size, shuffle=False):
        with autocast():
            logits = tickets.logits(to_layout(x, channels_last), training=False)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits.transpose(1, 2), y.expand(tickets.rows, -1), reduction="none").sum(1)
        correct += (logits.argmax(2) == y).sum(1)
    n = len(split)
    return [{"accuracy": 100.0 * c / n, "loss": s / n} for c, s in zip(correct.tolist(), loss_sum.tolist(), strict=True)]


def train_tickets(
    model: nn.Module,
    masks: Sequence[Mapping[str, torch.Tensor] | None],
    train_split: Split,
    test_split: Split | None,
    recipe: TrainRecipe,
    *,
    seed: int | Sequence[int],
    stage: str,
    start_epoch: int = 0,
    starts: Sequence[Mapping[str, torch.Tensor]] | None = None,
    snapshot_epochs: Collection[int] = (),
    checkpoint: Checkpoint | None = None,
    channels_last: bool = False,
    progress: bool = True,
) -> tuple[list[dict[str, torch.Tensor]], list[TrainResult]]:
    """Train ``masks[k] ⊙ model`` for every k, from ``start_epoch`` to the recipe's end, at once.

    ``model`` holds the shared start weights and is not modified. Returns each ticket's final state
    dict (CPU) and its :class:`TrainResult`, whose epoch ``seconds`` are the stacked run's
    wall-clock over K (each ticket's share). With ``checkpoint``, resumes as :func:`.loop.train`.
    ``recipe.virtual_ranks`` N > 1 trains each ticket as :func:`.loop.train` does in one pass: each
    rank's chunk with its own BatchNorm statistics, its loss weighted 1/N.

    Rows of several seeds (seeds as rows, ``runtime.stack_seeds``): ``seed`` then lists each row's
    seed, and ``starts`` each row's own start state (``model.state_dict()`` keys) in place of
    ``model``'s. Each seed's batches are drawn from its own generator, as :func:`.loop.train` draws
    them for that seed, and each row trains on its seed's batch. A ``None`` mask trains the row
    dense (every row's or none's); ``snapshot_epochs`` keeps each row's CPU state after that many
    epochs in its result's ``snapshots``, as :func:`.loop.train` does.
    """
    if not supports(model, recipe, train_split.device):
        raise ValueError("these tickets cannot train stacked; use training.train one by one")
    seeds = [seed] * len(masks) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(masks):
        raise ValueError(f"train_tickets: {len(masks)} rows but {len(seeds)} seeds")
    if any(m is None for m in masks) and not all(m is None for m in masks):
        raise ValueError("train_tickets: either every row has a mask or none has")
    for mask in masks:
        if mask is not None:
            check_mask_matches(model, mask)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    run = _StackedRun.set_up(model, masks, train_split, recipe, seeds=seeds, starts=starts, start_epoch=start_epoch,
                             channels_last=channels_last)
    loop = EpochLoop(stage, first=start_epoch, end=recipe.epochs, total=recipe.epochs, checkpoint=checkpoint,
                     progress=progress)
    if loop.resume(run.restore) is None and start_epoch in snapshot_epochs:
        run.snapshot(start_epoch)
    run.zero_pruned()
    for epoch in loop:
        per_sample, accuracy = run.train_epoch(epoch, stage)
        seconds = loop.seconds() / run.rows
        tests = None
        if test_split is not None and (loop.is_last(epoch) or (epoch + 1) % recipe.eval_every == 0):
            tests = run.test(test_split)
        if epoch + 1 in snapshot_epochs:
            run.snapshot(epoch + 1)
        loop.end_epoch(epoch, run.state, run.record_epoch(epoch, per_sample, accuracy, seconds, tests, stage))
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    states = [run.tickets.state_dict(k) for k in range(run.rows)]
    loop.finish()
    return states, run.results


@dataclasses.dataclass
class _StackedRun:
    """K tickets' stacked training: their weights as rows, the optimizer, the scaler and the step."""

    tickets: StackedTickets
    params: list[torch.Tensor]  # the tickets' stacked parameters, as the optimizer holds them
    keep: dict[str, torch.Tensor]  # each prunable weight's K masks, stacked like the weights (none: dense rows)
    seeds: list[int]  # each row's: its data order and augmentation
    train_split: Split
    recipe: TrainRecipe
    optimizer: torch.optim.SGD
    scaler: RowScaler | None
    precision: str  # the effective one: what steps and evaluations run in
    autocast: Callable[[], contextlib.AbstractContextManager]
    channels_last: bool
    results: list[TrainResult]

    @classmethod
    def set_up(cls, model: nn.Module, masks: Sequence[Mapping[str, torch.Tensor] | None], train_split: Split,
               recipe: TrainRecipe, *, seeds: list[int], starts: Sequence[Mapping[str, torch.Tensor]] | None,
               start_epoch: int, channels_last: bool) -> _StackedRun:
        device, rows = train_split.device, len(masks)
        precision = effective_precision(recipe.precision, device)
        tickets = StackedTickets(model, rows, recipe.virtual_ranks, starts)
        keep = {n: torch.stack([m[n].to(device=device, dtype=tickets.params[n].dtype) for m in masks])
                for n in (masks[0] or {})}
        params = list(tickets.params.values())
        optimizer = torch.optim.SGD(params, lr=recipe.lr_at(start_epoch),
                                    momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                                    nesterov=recipe.nesterov)
        return cls(tickets=tickets, params=params, keep=keep, seeds=seeds, train_split=train_split, recipe=recipe,
                   optimizer=optimizer,
                   scaler=RowScaler(rows, device) if precision == "fp16" else None, precision=precision,
                   autocast=autocast_for(precision, device), channels_last=channels_last,
                   results=[TrainResult() for _ in range(rows)])

    @property
    def rows(self) -> int:
        return len(self.results)

    @property
    def epoch_samples(self) -> int:
        """The epoch as the virtual ranks see it: padded so each gets the same share of the last batch."""
        return padded_size(len(self.train_split), RankLayout(self.recipe.virtual_ranks).parts)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.epoch_samples / self.recipe.batch_size)

    def restore(self, saved: Mapping) -> None:
        with torch.no_grad():
            for n, p in self.tickets.params.items():
                p.copy_(saved["params"][n])
            for n, b in self.tickets.buffers.items():
                b.copy_(saved["buffers"][n])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        for result, history, snapshots in zip(self.results, saved["history"],
                                              saved.get("snapshots") or [{}] * self.rows, strict=True):
            result.history = list(history)
            result.snapshots = {int(k): v for k, v in snapshots.items()}
            result.resumed_at = int(saved["epochs_done"])

    def state(self) -> dict:
        return {
            "params": {n: p.detach() for n, p in self.tickets.params.items()},
            "buffers": self.tickets.buffers,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "history": [r.history for r in self.results],
            "snapshots": [{str(k): v for k, v in r.snapshots.items()} for r in self.results],
        }

    def snapshot(self, epochs_done: int) -> None:
        """Each row's weights and buffers now, on the CPU, as its result's snapshot after ``epochs_done``."""
        for k, result in enumerate(self.results):
            result.snapshots[epochs_done] = self.tickets.state_dict(k)

    @torch.no_grad()
    def zero_pruned(self) -> None:
        """Pruned weights back to zero: one fused multiply over every layer (torch._foreach_mul_)."""
        if self.keep:  # dense rows have none
            torch._foreach_mul_([self.tickets.params[n] for n in self.keep], list(self.keep.values()))

    def train_epoch(self, epoch: int, stage: str) -> tuple[list[float], list[float]]:
        """One epoch of stacked steps: each ticket's per-sample training loss and accuracy (%)."""
        recipe, device = self.recipe, self.train_split.device
        self._set_lr(recipe.lr_at(epoch))
        step_losses = torch.zeros(self.steps_per_epoch, self.rows, device=device)
        correct = torch.zeros(self.rows, dtype=torch.int64, device=device)
        for step, (x, y) in enumerate(self._batches(epoch)):
            if epoch < recipe.warmup_epochs:
                self._set_lr(recipe.warmup_lr(epoch, step, self.steps_per_epoch))
            step_losses[step], right = self._step(x, y)
            correct += right
        check_finite(step_losses, stage=stage, epoch=epoch, epochs=recipe.epochs)
        denominator = self.epoch_samples if recipe.loss_reduction == "sum" else self.steps_per_epoch
        return (step_losses.sum(0) / denominator).tolist(), (100.0 * correct / self.epoch_samples).tolist()

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches: one ``(x, y)`` every row shares when the rows have one seed; else
        each seed's own batch (its generator, as :func:`.loop.train` draws it), given to its rows
        side by side in the channel dimension (``[B, K·C, …]``, the stacked layout of a per-row
        input) with labels ``[K, B]``."""
        recipe, device = self.recipe, self.train_split.device
        distinct = list(dict.fromkeys(self.seeds))
        streams = [iterate_batches(self.train_split, recipe.batch_size, shuffle=True,
                                   generator=generator(device, seed, "data-order", epoch), augment=recipe.augment,
                                   padding=recipe.crop_padding, parts=RankLayout(recipe.virtual_ranks).parts)
                   for seed in distinct]
        if len(streams) == 1:
            yield from streams[0]
            return
        stream_of_row = [distinct.index(seed) for seed in self.seeds]
        for batches in zip(*streams, strict=True):
            yield (torch.cat([batches[i][0] for i in stream_of_row], dim=1),
                   torch.stack([batches[i][1] for i in stream_of_row]))

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step of every ticket on the same batch; each one's loss and correct count."""
        params, scaler = self.params, self.scaler
        with self.autocast():
            logits = self.tickets.logits(to_layout(x, self.channels_last), training=True)
            # One cross-entropy over the K·B rows, then each ticket's mean (or sum) of its B.
            labels = y.expand(self.rows, -1) if y.dim() == 1 else y  # shared, or each row's own
            per_sample = F.cross_entropy(logits.float().flatten(0, 1), labels.reshape(-1), reduction="none")
            per_sample = per_sample.view(self.rows, -1)
            losses = per_sample.mean(1) if self.recipe.loss_reduction == "mean" else per_sample.sum(1)
        self.optimizer.zero_grad(set_to_none=True)
        # Rows share nothing: each ticket gets its own loss's gradient (under fp16, scaled by its own scale).
        # Under N virtual ranks a summed loss weighs 1/N, as each rank's does before DDP averages them
        # (a mean needs nothing: with equal chunks it is the mean of the ranks' means).
        weighted = losses / self.recipe.virtual_ranks if self.recipe.loss_reduction == "sum" and \
            self.recipe.virtual_ranks > 1 else losses
        (weighted if scaler is None else scaler.scaled(weighted)).sum().backward()
        finite = scaler.unscale_(params) if scaler is not None else None
        if self.recipe.grad_clip_norm is not None:
            _clip_per_row(params, self.recipe.grad_clip_norm)
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer, params, finite)
            scaler.update(finite)
        self.zero_pruned()
        return losses.detach(), (logits.detach().argmax(2) == labels).sum(1)

    def test(self, test_split: Split) -> list[dict[str, float]]:
        """Each ticket's test loss and accuracy, with its share of the evaluation's wall-clock."""
        started = time.perf_counter()
        tests = evaluate_stacked(self.tickets, test_split, self.recipe.eval_batch_size,
                                 channels_last=self.channels_last, precision=self.precision)
        share = (time.perf_counter() - started) / self.rows
        return [{"test_loss": t["loss"], "test_accuracy": t["accuracy"], "eval_seconds": share} for t in tests]

    def record_epoch(self, epoch: int, per_sample: list[float], accuracy: list[float], seconds: float,
                     tests: list[dict[str, float]] | None, stage: str) -> str:
        """Each ticket's record of the epoch, appended to its history; the log line saying them."""
        lr = self.optimizer.param_groups[0]["lr"]
        for k, result in enumerate(self.results):
            record = {"epoch": epoch + 1, "lr": lr, "train_loss": per_sample[k], "train_accuracy": accuracy[k],
                      "seconds": seconds, "shared_by": self.rows}
            if tests is not None:
                record.update(tests[k])
            result.history.append(record)
        return (f"{stage} epoch {epoch + 1}/{self.recipe.epochs}: lr {lr:.4g}, train loss "
                + " ".join(f"{v:.4f}" for v in per_sample) + ", test acc "
                + (" ".join(f"{t['test_accuracy']:.2f}" for t in tests) if tests else "-")
                + f" ({seconds:.1f} s per ticket)")


def probe_step(model: nn.Module, mask: Mapping[str, torch.Tensor] | None, train_split: Split, recipe: TrainRecipe,
               samples: int, *, seed: int, channels_last: bool = False) -> None:
    """One stacked training step of a single ticket on ``samples`` samples (no evaluation, no
    checkpoint): what :func:`.memory.plan_rows` measures to cap how many tickets train at once."""
    # (A probe's few samples may not deal equally to the virtual ranks; its memory hardly depends on them.)
    ranks = recipe.virtual_ranks if samples % recipe.virtual_ranks == 0 else 1
    probe = dataclasses.replace(recipe, epochs=1, batch_size=samples, warmup_epochs=0, milestones=[],
                                virtual_ranks=ranks)
    train_tickets(model, [mask], train_split.subset(samples), None, probe, seed=seed, stage="memory probe",
                  progress=False, channels_last=channels_last)


def eval_probe_step(model: nn.Module, mask: Mapping[str, torch.Tensor] | None, test_split: Split, samples: int, *,
                    channels_last: bool = False) -> None:
    """One stacked evaluation of a single ticket (``None``: the dense network) on ``samples`` test
    samples: what :func:`.memory.plan_rows` measures so that the tickets' test evaluation fits as well."""
    tickets = StackedTickets(model, 1)
    with torch.no_grad():
        for n, keep in (mask or {}).items():
            tickets.params[n].mul_(keep.to(tickets.params[n].device, tickets.params[n].dtype))
    evaluate_stacked(tickets, test_split.subset(samples), samples, channels_last=channels_last)


def stacked_training_ratio(model: nn.Module, masks: Sequence[Mapping[str, torch.Tensor] | None], train_split: Split,
                           recipe: TrainRecipe, *, seed: int | Sequence[int],
                           starts: Sequence[Mapping[str, torch.Tensor]] | None = None, channels_last: bool = False,
                           steps: int = 3) -> float:
    """The time of a stacked training step of the K tickets against K steps of one ticket: below 1,
    training them stacked saves time on this device.

    As for the search (``cts.stacked_search_ratio``), whether K stacked copies of the activations
    pay depends on the device and the shapes (ResNet-20 at batch 512 on a CPU: 2.1× slower), so it is
    measured. Each side trains copies of ``model`` (no test evaluation, no checkpoint) on one
    batch as a warm-up, then on one batch and on ``1 + steps`` batches; the difference is
    ``steps`` steps without the per-call set-up (stacking the parameters, building the optimizer),
    which a real retraining pays once. ``seed`` and ``starts`` are each row's, as
    :func:`train_tickets` takes them (seeds as rows); one ticket is the first row.
    """
    probe = dataclasses.replace(recipe, epochs=1, warmup_epochs=0, milestones=[])
    one_batch, more = train_split.subset(recipe.batch_size), train_split.subset((1 + steps) * recipe.batch_size)

    def stacked(split: Split) -> None:
        train_tickets(model, masks, split, None, probe, seed=seed, starts=starts, stage="stacking probe",
                      progress=False, channels_last=channels_last)

    def one(split: Split) -> None:
        first = copy.deepcopy(model)
        if starts is not None:
            first.load_state_dict(starts[0])
        train(first, split, None, probe, seed=seed if isinstance(seed, int) else seed[0], stage="stacking probe",
              mask=masks[0], progress=False, channels_last=channels_last)

    device = train_split.device
    return (seconds_per_step(stacked, one_batch, more, steps, device)
            / (len(masks) * seconds_per_step(one, one_batch, more, steps, device)))


@torch.no_grad()
def _clip_per_row(params: list[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` for each row (ticket) on its own: its norm over all its parameters."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.stack([g.float().pow(2).reshape(g.shape[0], -1).sum(1) for g in grads]).sum(0)
    coef = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for g in grads:
        g.mul_(_per_row(coef, g).to(g.dtype))
