"""Operations dispatched per ticket-step (what a launch-bound GPU pays), counted on the CPU (issue 35).

    python benchmarks/launches.py --write-docs     # both presets, about 10 min on 2 cores
    python benchmarks/launches.py --quick          # checks the script at toy sizes, writes nothing
    PYTHONPATH=src python benchmarks/launches.py --device cuda --write-docs   # the GPU's times (gpu.sh)

On a GPU a small network's step is bound by kernel launches, not arithmetic, so the aten operations
a step dispatches (core/device/dispatched_ops.py) predict what it costs there; they do not depend
on the machine. Each row is the project's own ``train``, ``concrete_search`` or ``train_tickets``
on an epoch of 2 steps and on one of 1 step: the difference is one step without the epoch's fixed
costs (building the model, the data order, the first step's checks). "Per ticket-step"
divides by the tickets (densities, or retrained tickets) that step advances. The wall-clock is
measured the same way, without the counter, from the fastest of ``--repeats`` epochs of each length.

Each preset as its conf/ files give it (presets.py): `cifar10_resnet20` (ResNet-20, batch 512 as 4
virtual ranks, summed loss clipped at 2.0; fp32 on a CPU, fp16 on a GPU) and the default `base`
(the digits convnet, batch 64, one rank). The 4-rank rows of the default are the same recipe with
``virtual_ranks: 4``: there ghost BatchNorm meets a network with running statistics. The default
also has the grid's rows (``runtime.stack_seeds``): 3 seeds' dense runs stacked, their 5 × 3
searches as rows of one, and their 5 × 3 tickets retrained stacked, each row with its own seed's
weights, noise and batches.
"""

from __future__ import annotations

import argparse
import datetime
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from docs_blocks import BlockWriter
from presets import preset
from speed import sync, synthetic

from cts_pipeline.core.cts import concrete_search
from cts_pipeline.core.device.dispatched_ops import DispatchedOps
from cts_pipeline.core.device.runtime import describe_hardware, precision_label, training_device
from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.batched import supports as stacked_supported
from cts_pipeline.core.train.batched import train_tickets
from cts_pipeline.core.train.loop import effective_precision, train

STEPS = (1, 2)  # the two epoch lengths whose difference is one step's cost
GRID_SEEDS = (0, 1, 2)  # the seeds of the grid rows (issue 35: the default grid, 5 sparsities × 3 seeds)


@dataclass
class Row:
    label: str
    tickets: int
    ops: float  # aten operations per step
    kernels: float  # of which not views
    seconds: float  # per step

    def per_ticket(self, value: float) -> float:
        return value / self.tickets


def per_step(run_epoch: Callable[[int], None], repeats: int, device: torch.device) -> tuple[float, float, float]:
    """(ops, non-view ops, seconds) of one step: ``run_epoch(n)`` runs an epoch of ``n`` steps."""
    run_epoch(STEPS[0])  # warm-up
    counted = []
    for steps in STEPS:
        with DispatchedOps() as ops:
            run_epoch(steps)
        counted.append((len(ops), ops.kernels))
    span = STEPS[1] - STEPS[0]
    fastest = {steps: math.inf for steps in STEPS}  # the fastest of the repeats: timing noise only adds
    for _ in range(repeats):
        for steps in STEPS:
            sync(device)
            started = time.perf_counter()
            run_epoch(steps)
            sync(device)
            fastest[steps] = min(fastest[steps], time.perf_counter() - started)
    seconds = max(fastest[STEPS[1]] - fastest[STEPS[0]], 0.0) / span if repeats else math.nan  # --quick: not timed
    return (counted[1][0] - counted[0][0]) / span, (counted[1][1] - counted[0][1]) / span, seconds


def rows_for(name: str, device: torch.device, repeats: int, quick: bool, ranks: int = 4,
             grid: bool = False) -> tuple[str, list[Row]]:
    paper = preset(name)
    batch = 32 if quick else paper.recipe.batch_size
    options = {**paper.model_options, **({"width": 8} if quick and paper.model == "resnet20" else {})}
    k = len(paper.densities[:5])
    densities = paper.densities[-k:]
    # One epoch of n steps: the recipe's own settings apart from the schedule (one epoch, no rewind).
    recipe = replace(paper.recipe, epochs=1, rewind_epoch=0, milestones=(), batch_size=batch, eval_every=1)
    search = replace(paper.search, epochs=1)
    split = synthetic(paper.dataset, batch * STEPS[1], device)
    channels_last = paper.model != "lenet_300_100"  # runtime.channels_last: auto, for the CNNs

    def fresh():
        return build_model(paper.model, image_shape=split.info.image_shape, num_classes=split.info.num_classes,
                           generator=torch.Generator().manual_seed(0), **options).to(device)

    theta = fresh()
    g = torch.Generator().manual_seed(1)
    masks = [global_topk_mask({n: torch.rand(w.shape, generator=g) for n, w in prunable_parameters(theta).items()}, d)
             for d in densities]

    def subset(steps: int):
        return split.subset(batch * steps)

    def training(virtual_ranks: int, passes: str, mask=None):
        r = replace(recipe, virtual_ranks=virtual_ranks)
        return lambda steps: train(fresh(), subset(steps), None, r, seed=0, stage="launches", mask=mask,
                                   progress=False, channels_last=channels_last, rank_passes=passes)

    def searching(virtual_ranks: int, found: list[float], passes: str = "sequential"):
        r = replace(recipe, virtual_ranks=virtual_ranks)
        return lambda steps: concrete_search(theta, subset(steps), density=found if len(found) > 1 else found[0],
                                             config=search, recipe=r, seed=0, progress=False,
                                             channels_last=channels_last, rank_passes=passes)

    def stacked(virtual_ranks: int):
        r = replace(recipe, virtual_ranks=virtual_ranks)
        return lambda steps: train_tickets(fresh(), masks, subset(steps), None, r, seed=0, stage="launches",
                                           progress=False, channels_last=channels_last)

    # Seeds as rows (runtime.stack_seeds), under the preset's own ranks: each seed its own weights
    # and its own batches. The grid's tickets: every density of every seed.
    seed_starts = [build_model(paper.model, image_shape=split.info.image_shape, num_classes=split.info.num_classes,
                               generator=torch.Generator().manual_seed(seed), **options).state_dict()
                   for seed in GRID_SEEDS]

    def seeds_as_rows(with_masks: bool):
        rows = [(seed, start, mask) for seed, start in zip(GRID_SEEDS, seed_starts, strict=True)
                for mask in (masks if with_masks else [None])]
        return lambda steps: train_tickets(fresh(), [m for _, _, m in rows], subset(steps), None, recipe,
                                           seed=[s for s, _, _ in rows], starts=[st for _, st, _ in rows],
                                           stage="launches", progress=False, channels_last=channels_last)

    plan: list[tuple[str, int, Callable[[int], None] | None]] = [
        ("train, 1 rank", 1, training(1, "sequential")),
        (f"train, {ranks} ranks one after another (`virtual_rank_passes: sequential`)", 1, training(ranks, "sequential")),
        (f"train, {ranks} ranks in one pass (ghost BatchNorm, `one`)", 1, training(ranks, "one")),
        ("search, 1 density, 1 rank", 1, searching(1, densities[-1:])),
        (f"search, 1 density, {ranks} ranks one after another", 1, searching(ranks, densities[-1:])),
        (f"search, 1 density, {ranks} ranks as rows of one pass", 1, searching(ranks, densities[-1:], "one")),
        (f"search, {k} densities, 1 rank", k, searching(1, densities)),
        (f"search, {k} densities, {ranks} ranks one after another", k, searching(ranks, densities)),
        (f"search, {k} densities × {ranks} ranks as rows of one pass", k, searching(ranks, densities, "one")),
        (f"retraining, {k} tickets stacked, 1 rank", k,
         stacked(1) if stacked_supported(theta, replace(recipe, virtual_ranks=1), device) else None),
        (f"retraining, {k} tickets under {ranks} ranks: one at a time, in one pass", 1,
         training(ranks, "one", masks[-1])),
        (f"retraining, {k} tickets stacked under {ranks} ranks (one pass)", k,
         stacked(ranks) if stacked_supported(theta, replace(recipe, virtual_ranks=ranks), device) else None),
    ]
    def seeds_searching():
        return lambda steps: concrete_search(fresh(), subset(steps), density=densities, config=search, recipe=recipe,
                                             seed=list(GRID_SEEDS), starts=seed_starts, progress=False,
                                             channels_last=channels_last)

    if grid:  # the default grid: S seeds' dense runs, searches and retrainings, each as one stacked network
        own = f"{recipe.virtual_ranks} rank{'s' if recipe.virtual_ranks > 1 else ''}"
        plan += [
            (f"dense training, {len(GRID_SEEDS)} seeds stacked (`stack_seeds`), {own}", len(GRID_SEEDS),
             seeds_as_rows(False)),
            (f"search, the grid: {k} densities × {len(GRID_SEEDS)} seeds as rows, {own}", k * len(GRID_SEEDS),
             seeds_searching()),
            (f"retraining, the grid: {k} densities × {len(GRID_SEEDS)} seeds stacked, {own}", k * len(GRID_SEEDS),
             seeds_as_rows(True)),
        ]
    rows = []
    for label, tickets, run_epoch in plan:
        if run_epoch is None:
            continue
        ops, kernels, seconds = per_step(run_epoch, repeats, device)
        rows.append(Row(label, tickets, ops, kernels, seconds))
        print(f"{name}: {label}: {ops:.0f} ops ({kernels:.0f} not views), {1000 * seconds:.1f} ms per step", flush=True)
    header = (f"**{name}**: {replace(paper, recipe=replace(recipe, virtual_ranks=ranks), model_options=options).describe()}"
              f"; {precision_label(effective_precision(recipe.precision, device), device)}; K = {k} densities "
              f"({', '.join(f'{d:.4f}' for d in densities)}).")
    return header, rows


def table_lines(header: str, rows: list[Row], device: torch.device) -> list[str]:
    one = rows[0]
    lines = [header, "",
             f"| step | aten ops per step | not views | per ticket-step | against 1 ticket, 1 rank | "
             f"{device.type.upper()} ms per ticket-step |",
             "|---|---:|---:|---:|---:|---:|"]
    search_one = next(r for r in rows if r.label.startswith("search, 1 density, 1 rank"))
    for row in rows:
        reference = search_one if row.label.startswith("search") else one
        lines.append(f"| {row.label} | {row.ops:,.0f} | {row.kernels:,.0f} | {row.per_ticket(row.ops):,.0f} | "
                     f"{row.per_ticket(row.ops) / reference.ops:.2f}× | {1000 * row.per_ticket(row.seconds):.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", default="cifar10_resnet20,base")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="batch 32, a narrow ResNet-20, nothing timed: checks the script")
    parser.add_argument("--write-docs", action="store_true", help="rewrite this device's block in docs/performance.md")
    args = parser.parse_args()
    if args.write_docs and args.quick:
        raise SystemExit("--quick checks the script; its figures say nothing and are not written")
    device = training_device(args.device)
    table = BlockWriter("docs/performance.md", f"launches-{device.type}", to_docs=args.write_docs)
    table.add(f"`python benchmarks/launches.py{' --quick' if args.quick else ''} --device {device.type}`, "
              f"{datetime.date.today()}, {describe_hardware(device)}. Search rows are "
              "against the 1-density 1-rank search step, the others against the 1-rank training step.")
    for name in args.presets.split(","):
        header, rows = rows_for(name, device, 0 if args.quick else args.repeats, args.quick, grid=name == "base")
        table.add("", *table_lines(header, rows, device))
    table.finish()


if __name__ == "__main__":
    main()
