"""One SGD training loop for dense and sparse runs (the recipe: :mod:`.recipe`), and evaluation."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts.checkpoints import Checkpoint
from ..data.splits import Split, iterate_batches
from ..device.distributed import all_sum, rank_and_world, shard, with_sync_batchnorm
from ..device.ghost_batchnorm import ghost_batchnorm
from ..device.runtime import generator
from ..device.virtual_ranks import RankLayout, padded_size, running_stats_of
from ..nets.masks import check_mask_matches, prunable_parameters
from .epochs import EpochLoop
from .recipe import TrainRecipe

logger = logging.getLogger(__name__)

class NonFiniteLossError(FloatingPointError):
    """Training or search produced a NaN or infinite loss; the message names the stage and step."""


@dataclass
class TrainResult:
    """What a training run leaves behind besides the weights (which are trained in place)."""

    history: list[dict] = field(default_factory=list)
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    resumed_at: int | None = None  # epochs already done when a checkpoint was resumed

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    @property
    def seconds(self) -> float:
        """Wall-clock of all epochs' training, across resumes (each epoch records its own);
        test evaluations are timed apart (:attr:`eval_seconds`), since stages evaluate at
        different rates."""
        return sum(r["seconds"] for r in self.history)

    @property
    def eval_seconds(self) -> float:
        return sum(r.get("eval_seconds", 0.0) for r in self.history)

    def seconds_until(self, epochs_done: int) -> float:
        return sum(r["seconds"] for r in self.history if r["epoch"] <= epochs_done)


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000, *, channels_last: bool = False,
             precision: str = "fp32") -> dict[str, float]:
    """Accuracy (%) and mean cross-entropy on ``split`` in eval mode, without autograd, under the
    autocast of ``precision`` (the training's effective one: evaluating a bf16 ResNet-20 in fp32
    costs a GPU 10-20 % of its epoch; the loss is summed in float32 all the same)."""
    was_training = model.training
    model.eval()
    device = split.device
    autocast = autocast_for(precision, device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in iterate_batches(split, batch_size, shuffle=False):
        with autocast():
            logits = model(to_layout(x, channels_last))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = len(split)
    return {"accuracy": 100.0 * correct.item() / n, "loss": loss_sum.item() / n}


def train(
    model: nn.Module,
    train_split: Split,
    test_split: Split | None,
    recipe: TrainRecipe,
    *,
    seed: int,
    stage: str,
    start_epoch: int = 0,
    end_epoch: int | None = None,
    mask: Mapping[str, torch.Tensor] | None = None,
    snapshot_epochs: Collection[int] = (),
    checkpoint: Checkpoint | None = None,
    channels_last: bool = False,
    compile_model: bool = False,
    sync_batchnorm: bool = False,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    progress: bool = True,
    rank_passes: str = "auto",
) -> TrainResult:
    """Train ``model`` in place from ``start_epoch`` to ``end_epoch`` (default: the recipe's end).

    ``model`` and both splits must already be on the training device. With ``mask``, pruned weights
    are zeroed before the first step and after every step, so they stay exactly zero.
    ``snapshot_epochs``: keep a CPU copy of the weights after that many epochs (0 = before any
    training), e.g. the rewind point ``θ_k``. With ``checkpoint``, the state is saved after every
    epoch and a matching checkpoint is resumed: since the data order of epoch ``e`` depends only on
    ``(seed, e)``, the result equals that of an uninterrupted run. ``channels_last`` runs
    convolutions in NHWC (faster on CPUs); ``compile_model`` wraps the forward in ``torch.compile``.
    ``sync_batchnorm``: in a process group, BatchNorm normalises over the global batch
    (:func:`..device.distributed.with_sync_batchnorm`) instead of each rank's slice.
    ``rank_passes``: how a process plays its ``recipe.virtual_ranks`` (:data:`..device.virtual_ranks.RANK_PASSES`):
    in one pass with ghost BatchNorm, one chunk after another, or auto (one pass on a GPU).
    """
    end_epoch = recipe.epochs if end_epoch is None else end_epoch
    run = _TrainingRun.set_up(model, train_split, recipe, mask=mask, start_epoch=start_epoch,
                              channels_last=channels_last, compile_model=compile_model,
                              sync_batchnorm=sync_batchnorm, rank_passes=rank_passes)
    with run.released:
        return _train_epochs(run, test_split, recipe, seed=seed, stage=stage, start_epoch=start_epoch,
                             end_epoch=end_epoch, snapshot_epochs=snapshot_epochs, checkpoint=checkpoint,
                             channels_last=channels_last, on_epoch_end=on_epoch_end, progress=progress)


def _train_epochs(run: _TrainingRun, test_split: Split | None, recipe: TrainRecipe, *, seed: int, stage: str,
                  start_epoch: int, end_epoch: int, snapshot_epochs: Collection[int], checkpoint: Checkpoint | None,
                  channels_last: bool, on_epoch_end: Callable[[int, nn.Module], None] | None,
                  progress: bool) -> TrainResult:
    result = TrainResult()
    loop = EpochLoop(stage, first=start_epoch, end=end_epoch, total=recipe.epochs, checkpoint=checkpoint,
                     progress=progress)
    result.resumed_at = loop.resume(lambda saved: run.restore(saved, result))
    if result.resumed_at is None and start_epoch in snapshot_epochs:
        result.snapshots[start_epoch] = state_on_cpu(run.model)
    run.zero_pruned()
    for epoch in loop:
        record = run.train_epoch(epoch, seed, stage)
        record["seconds"] = loop.seconds()  # training only: evaluation is timed apart
        if test_split is not None and (loop.is_last(epoch) or (epoch + 1) % recipe.eval_every == 0):
            record.update(run.test(test_split))
        result.history.append(record)
        if epoch + 1 in snapshot_epochs:
            result.snapshots[epoch + 1] = state_on_cpu(run.model)
        loop.end_epoch(epoch, lambda: run.state(result), _format_epoch(stage, record, recipe.epochs), postfix={
            "loss": f"{record['train_loss']:.3f}", "acc": f"{record.get('test_accuracy', record['train_accuracy']):.1f}"})
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, run.model)
    if channels_last:
        run.model.to(memory_format=torch.contiguous_format)  # callers get the usual layout back
    loop.finish()
    return result


@dataclass
class _TrainingRun:
    """One training's set-up (the optimizer, the scaler, the ranks, the mask) and its step."""

    model: nn.Module
    forward: nn.Module  # what a step calls: the model, under DDP and/or torch.compile
    train_split: Split
    recipe: TrainRecipe
    optimizer: torch.optim.SGD
    scaler: torch.amp.GradScaler | None
    precision: str  # the effective one (effective_precision): what steps and evaluations run in
    autocast: Callable[[], contextlib.AbstractContextManager]
    params: list[torch.Tensor]
    masked: tuple[list[torch.Tensor], list[torch.Tensor]] | None
    ranks: RankLayout
    one_pass: bool  # this process's ranks in one forward and backward (ghost BatchNorm)
    channels_last: bool
    released: contextlib.ExitStack  # what the run installed on the model, undone on leaving it

    @classmethod
    def set_up(cls, model: nn.Module, train_split: Split, recipe: TrainRecipe, *, mask, start_epoch: int,
               channels_last: bool, compile_model: bool, sync_batchnorm: bool,
               rank_passes: str = "auto") -> _TrainingRun:
        device = train_split.device
        precision = effective_precision(recipe.precision, device)
        rank, world = rank_and_world()
        ranks = RankLayout(recipe.virtual_ranks, rank, world, presharded=train_split.streamed)
        # (SyncBatchNorm normalises the global batch; config.validate_run refuses it with recipe ranks.)
        one_pass = ranks.one_pass(rank_passes, device) and not (world > 1 and sync_batchnorm)
        masked = _mask_pairs(model, mask, device)
        # What the run installs on the model is undone if setting it up fails, else when it ends.
        with contextlib.ExitStack() as installed:
            if one_pass:  # before DDP is built below: it keeps the buffers the ghost BatchNorm puts in place
                installed.enter_context(ghost_batchnorm(model, ranks.per_process))
            if channels_last:
                model.to(memory_format=torch.channels_last)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer, scaler = optimizer_and_scaler(params, recipe, recipe.lr_at(start_epoch), precision, device)
            if world > 1:
                model = with_sync_batchnorm(model, sync_batchnorm)
            run = cls(model=model, forward=training_forward(model, world, compile_model), train_split=train_split,
                       recipe=recipe, optimizer=optimizer, scaler=scaler, precision=precision,
                       autocast=autocast_for(precision, device), params=params, masked=masked, ranks=ranks,
                       one_pass=one_pass, channels_last=channels_last, released=installed.pop_all())
        return run

    @property
    def epoch_samples(self) -> int:
        """The epoch as the ranks see it: padded so each gets the same share of the last batch."""
        return padded_size(len(self.train_split), self.ranks.parts)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.epoch_samples / self.recipe.batch_size)

    def restore(self, saved: Mapping, result: TrainResult) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        result.history = list(saved["history"])
        result.snapshots = {int(k): v for k, v in saved["snapshots"].items()}

    def state(self, result: TrainResult) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "history": result.history,
            "snapshots": {str(k): v for k, v in result.snapshots.items()},
        }

    def zero_pruned(self) -> None:
        _zero_pruned(self.masked)

    def train_epoch(self, epoch: int, seed: int, stage: str) -> dict:
        """One epoch of steps; its record (the global batch's loss and accuracy on every rank)."""
        recipe, device = self.recipe, self.train_split.device
        self._set_lr(recipe.lr_at(epoch))
        self.model.train()
        step_losses = torch.zeros(self.steps_per_epoch, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        batches = iterate_batches(
            self.train_split, recipe.batch_size, shuffle=True,
            generator=generator(device, seed, "data-order", epoch), augment=recipe.augment,
            padding=recipe.crop_padding, parts=self.ranks.parts,
        )
        for step, (x, y) in enumerate(batches):
            if epoch < recipe.warmup_epochs:
                self._set_lr(recipe.warmup_lr(epoch, step, self.steps_per_epoch))
            step_losses[step], right = self._step(x, y)
            correct += right
        all_sum(step_losses, correct)
        # One host sync per epoch instead of one per step; the failing step is still named exactly.
        check_finite(step_losses, stage=stage, epoch=epoch, epochs=recipe.epochs)
        per_sample = step_losses.sum().item() / (
            self.epoch_samples if recipe.loss_reduction == "sum" else self.steps_per_epoch)
        return {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], "train_loss": per_sample,
                "train_accuracy": 100.0 * correct.item() / self.epoch_samples}

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a global batch: this process's part of its loss (summed over
        processes by the caller) and its correct count."""
        ranks, world = self.ranks, self.ranks.processes
        share = 1.0
        if world > 1 and ranks.plain:
            x, y, share = shard(x, y, ranks.process, world, presharded=self.train_split.streamed)
            # A process's loss is weighted to its part of the global batch's: by its slice's share
            # of the batch for a mean, by the number of processes for a sum (DDP averages the
            # gradients). With N recipe ranks each chunk weighs 1/N (ranks.loss_weight).
            share = float(world) if self.recipe.loss_reduction == "sum" else share
        self.optimizer.zero_grad(set_to_none=True)
        loss, correct = self._forward_backward(x, y, share)
        self._update()
        _zero_pruned(self.masked)
        if ranks.plain and world > 1:
            # Under DDP: this rank's part of the global batch's loss, summed over ranks afterwards.
            loss = loss * (1.0 if self.recipe.loss_reduction == "sum" else share / world)
        return loss, correct

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, share: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of one global batch: one chunk per virtual rank of this process
        (core/device/virtual_ranks.py), the plain step being the one chunk. Under DDP only the
        last chunk's backward reduces the gradients. Returns the batch's loss and correct count."""
        ranks, recipe = self.ranks, self.recipe
        if self.one_pass:
            return self._one_pass(x, y)
        chunks = ranks.chunks(x, y)
        loss_sum = correct = None
        for part, (x_part, y_part) in enumerate(chunks):
            # (DDP decides at the forward whether the backward reduces: no_sync covers it.)
            with (running_stats_of(self.model, part), _gradient_sync(self.forward, part == len(chunks) - 1),
                  self.autocast()):
                logits = self.forward(to_layout(x_part, self.channels_last))
                loss = F.cross_entropy(logits.float(), y_part, reduction=recipe.loss_reduction)
                if not ranks.plain:  # DDP's average over the recipe's ranks' gradients
                    weighted = loss * ranks.loss_weight
                else:
                    weighted = loss * share if ranks.processes > 1 else loss
            (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
            # The batch's loss is the mean of its chunks' means (or the sum of their sums).
            part_loss = loss.detach() if ranks.plain or recipe.loss_reduction == "sum" else loss.detach() / ranks.ranks
            part_correct = (logits.detach().argmax(1) == y_part).sum()
            loss_sum = part_loss if loss_sum is None else loss_sum + part_loss
            correct = part_correct if correct is None else correct + part_correct
        return loss_sum, correct

    def _one_pass(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's P = N/M ranks in one forward and backward of its part of the batch, each
        rank's BatchNorm statistics its own (ghost BatchNorm, installed by :meth:`set_up`). The
        loss weights are the sequential chunks' summed: for a mean, ``Σ_c (M/N)·mean_c = mean`` of
        the part (the chunks are equal); for a sum, ``(M/N)·sum``. So is the loss reported."""
        ranks, reduction = self.ranks, self.recipe.loss_reduction
        x, y = ranks.process_part(x, y)
        with self.autocast():
            logits = self.forward(to_layout(x, self.channels_last))
            loss = F.cross_entropy(logits.float(), y, reduction=reduction)
            weighted = loss if reduction == "mean" else loss * ranks.loss_weight
        (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
        # Reported as the sequential chunks add it up: Σ_c mean_c/N = mean·P/N, or Σ_c sum_c.
        reported = loss.detach() * (ranks.per_process / ranks.ranks) if reduction == "mean" else loss.detach()
        return reported, (logits.detach().argmax(1) == y).sum()

    def _update(self) -> None:
        """The optimizer step (unscaled and clipped first where the recipe asks)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.recipe.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.recipe.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def test(self, test_split: Split) -> dict[str, float]:
        started = time.perf_counter()
        test = evaluate(self.model, test_split, self.recipe.eval_batch_size, channels_last=self.channels_last,
                        precision=self.precision)
        return {"test_loss": test["loss"], "test_accuracy": test["accuracy"],
                "eval_seconds": time.perf_counter() - started}


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A step's autocast context for ``precision`` (none for fp32: entering a disabled autocast
    still costs per step)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def training_forward(model: nn.Module, world: int, compile_model: bool) -> nn.Module:
    """What a training step calls: under a process group (:mod:`..device.distributed`), DDP over ``model``
    so gradients average over ranks; with ``compile_model``, ``torch.compile`` around that. In
    this order dynamo's DDP optimizer cuts the graph at DDP's gradient buckets, so each bucket's
    all-reduce still overlaps the rest of the backward (compiled first, DDP would see one opaque
    module and reduce everything after the backward)."""
    forward = model
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(forward)
    if compile_model:
        forward = torch.compile(forward)
    return forward


def _gradient_sync(forward: nn.Module, last_chunk: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for all but a step's last chunk: gradients accumulate locally, and the
    last backward reduces their sum once (a plain or one-chunk step: nothing to do)."""
    ddp = getattr(forward, "_orig_mod", forward)  # under torch.compile, the DDP module it wraps
    if last_chunk or not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def optimizer_and_scaler(params: list[torch.Tensor], recipe: TrainRecipe, lr: float, precision: str,
                         device: torch.device) -> tuple[torch.optim.SGD, torch.amp.GradScaler | None]:
    """The recipe's SGD and, for fp16, its gradient scaler. Under fp16 the SGD is fused: the scaler
    then hands the optimizer its found-inf flag on the device instead of reading it with
    ``.item()``, so a step never waits for the host (a plain SGD would sync every step)."""
    fp16 = precision == "fp16"
    optimizer = torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                                nesterov=recipe.nesterov, fused=True if fp16 else None)
    if fp16 and recipe.momentum:
        # torch's fused SGD (2.11-2.14, torch/optim/sgd.py, _fused_sgd) makes its momentum buffers
        # with empty_like at the first step and fills them in the kernel, which a step the scaler
        # skips for an overflow never runs: the next step would read uninitialised memory (found
        # when a first step overflowed and the weights became inf). Zero buffers are what SGD's
        # first step means (buffer = gradient, without dampening), so they are made here.
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer, torch.amp.GradScaler(device.type) if fp16 else None


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An image batch in NHWC when ``channels_last`` (other tensors as they are)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def state_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of the weights and buffers (a snapshot, a catalog entry)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def check_finite(step_losses: torch.Tensor, *, stage: str, epoch: int, epochs: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the first step of ``epoch`` whose loss is not finite."""
    finite = torch.isfinite(step_losses)
    if bool(finite.all()):
        return
    if finite.dim() > 1:  # a batched search: one column per density; name the first bad value
        bad_step, bad_row = (int(i) for i in (~finite).nonzero()[0])
        value, where = step_losses[bad_step, bad_row].item(), f" (row {bad_row + 1} of {finite.shape[1]})"
        finite, step = finite.all(-1), bad_step
    else:
        step = int((~finite).nonzero()[0])
        value, where = step_losses[step].item(), ""
    raise NonFiniteLossError(
        f"{stage}{where}: the loss became {value} at epoch {epoch + 1}/{epochs}, "
        f"step {step + 1}/{step_losses.shape[0]}; stopping. Lower the learning rate or set "
        "training.grad_clip_norm."
    )


def _format_epoch(stage: str, record: dict, epochs: int) -> str:
    text = (
        f"{stage} epoch {record['epoch']}/{epochs}: lr {record['lr']:.4g}, "
        f"train loss {record['train_loss']:.4f}, train acc {record['train_accuracy']:.2f} %"
    )
    if "test_accuracy" in record:
        text += f", test acc {record['test_accuracy']:.2f} %"
    return text + f" ({record['seconds']:.1f} s" + (f" + {record['eval_seconds']:.1f} s test" if "eval_seconds" in record else "") + ")"


def effective_precision(precision: str, device: torch.device) -> str:
    """What ``training.precision`` means on ``device``: ``auto`` is bf16 on a CUDA device with
    native bf16 (compute capability 8 and up) and fp32 elsewhere; half precision asked for
    explicitly on a CPU trains in fp32, with a warning."""
    if precision == "auto":
        native_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        return "bf16" if native_bf16 else "fp32"
    if precision != "fp32" and device.type != "cuda":
        logger.warning("training.precision=%s applies on CUDA only; training in fp32 on %s", precision, device)
        return "fp32"
    return precision


def _mask_pairs(model: nn.Module, mask: Mapping[str, torch.Tensor] | None, device: torch.device):
    if mask is None:
        return None
    check_mask_matches(model, mask)
    weights = prunable_parameters(model)
    names = list(weights)
    return [weights[n] for n in names], [mask[n].to(device=device, dtype=weights[n].dtype) for n in names]


@torch.no_grad()
def _zero_pruned(masked) -> None:
    """Pruned weights back to zero: one fused multiply over every layer (torch._foreach_mul_)."""
    if masked is not None:
        torch._foreach_mul_(*masked)
