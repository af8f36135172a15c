"""The whole grid against LTR per epoch of work (issue 8): ResNet-20 on CIFAR-shaped noise, in plain
PyTorch, so it runs where Kedro and MLflow are not installed (the GPU machine).

    PYTHONPATH=src python benchmarks/grid_epochs.py --device cuda --write-docs
    python benchmarks/grid_epochs.py --images 2048 --write-docs   # the CPU row (about 10 min, 2 cores)
    python benchmarks/grid_epochs.py --quick                       # checks the script in a minute

It times one epoch of each kind of work the grid needs (the median of --repeats after a warm-up
epoch), on the same weights and data, with the `cifar10_resnet20` preset's network, recipe and
search exactly as its conf/ files give them (presets.py: conv3x3 shortcut, batch statistics at test
time, U(0, 1) BatchNorm weights, batch 512 as 4 virtual ranks, summed loss clipped at 2.0, reflect
padding, fp16 on CUDA; a CPU trains in fp32):
  - a masked training epoch: LTR's unit, since every level retrains from the rewind epoch;
  - a search epoch at one density, and CTS's batched search over the K grid densities (the
    search's own arithmetic: fp32 logits, the masked forward in fp32);
  - CTS's retraining of the K tickets: stacked where the model allows it, the preset's
    ``virtual_ranks: 4`` in one pass (each rank's BatchNorm statistics its own); else one at a
    time (K masked epochs).

It then composes the whole grid from the preset's epoch counts (E, rewind k, the grid's levels):
LTR pays (L_max + 1) · (E − k) training epochs; CTS pays E_search search epochs (E `long`, int(E/8)
`short`) and (E − k) retraining epochs. The dense training to θ_k and the test evaluations are
common to both sides and left out. CTS is costed both ways, batched and one at a time
(`runtime.batch_sparsities: auto` picks the faster), and the ratio uses the faster.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from dataclasses import replace

import torch
from docs_blocks import BlockWriter
from presets import preset
from speed import sync, synthetic

from cts_pipeline.core.cts import concrete_search
from cts_pipeline.core.device.runtime import describe_hardware, precision_label, training_device
from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.batched import supports as stacked_retraining_supported
from cts_pipeline.core.train.batched import train_tickets
from cts_pipeline.core.train.loop import effective_precision, train

PRESET = "cifar10_resnet20"


def median_seconds(run, repeats: int, device: torch.device) -> float:
    run()  # warm-up: allocations, cuDNN's algorithm choice, the stacked-forward check
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=10_240, help="images per timed epoch")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a small network (width 8) and 2 levels: checks the script")
    parser.add_argument("--write-docs", action="store_true", help="rewrite this device's block in docs/performance.md")
    args = parser.parse_args()
    if args.write_docs and args.quick:
        raise SystemExit("--quick checks the script; its figures say nothing and are not written")
    device = training_device(args.device)
    paper = preset(PRESET)
    epochs, rewind = paper.recipe.epochs, paper.recipe.rewind_epoch
    search_epochs = {"long": replace(paper.search, search_length="long").search_epochs(epochs),
                     "short": replace(paper.search, search_length="short").search_epochs(epochs)}
    levels = paper.levels[-2:] if args.quick else paper.levels
    images = 256 if args.quick else args.images
    batch = 64 if args.quick else args.batch_size or paper.recipe.batch_size
    # Width 8, not 4: below 8 input channels the 1x1 strided shortcut's NHWC backward corrupts
    # memory on AVX2 CPUs (core.device.runtime.channels_last_hazard), and --quick is run on CPUs.
    options = {**paper.model_options, **({"width": 8} if args.quick else {})}
    split = synthetic(paper.dataset, images, device)
    recipe = replace(paper.recipe, epochs=1, batch_size=batch, rewind_epoch=0, milestones=())
    config = replace(paper.search, epochs=1)
    channels_last = True

    def fresh():
        return build_model(paper.model, image_shape=split.info.image_shape, num_classes=split.info.num_classes,
                           generator=torch.Generator().manual_seed(0), **options).to(device)

    theta = fresh()
    densities = [0.8 ** level for level in levels]
    g = torch.Generator().manual_seed(1)
    masks = [global_topk_mask({n: torch.rand(w.shape, generator=g) for n, w in prunable_parameters(theta).items()}, k)
             for k in densities]

    def masked_epoch():  # an LTR level's epoch, and a one-by-one retraining's
        train(fresh(), split, None, recipe, seed=0, stage="ltr epoch", mask=masks[-1], progress=False,
              channels_last=channels_last)

    def search_epoch(density):
        concrete_search(theta, split, density=density, config=config, recipe=recipe, seed=0,
                        progress=False, channels_last=channels_last)

    stacked = stacked_retraining_supported(theta, recipe, device)

    def retraining_epoch():
        train_tickets(fresh(), masks, split, None, recipe, seed=0, stage="stacked epoch", progress=False,
                      channels_last=channels_last)

    k = len(levels)
    table = BlockWriter("docs/performance.md", f"grid-epochs-{device.type}", to_docs=args.write_docs)
    table.add(
        f"`python benchmarks/grid_epochs.py{' --quick' if args.quick else ''}"
        f"{f' --images {images}' if not args.quick and images != 10_240 else ''} --device {device.type}`, "
        f"{datetime.date.today()}, {describe_hardware(device)}. "
        f"{replace(paper, recipe=recipe, model_options=options).describe()}"
        f"{' (a check of the script)' if args.quick else ''}; training in "
        f"{precision_label(effective_precision(recipe.precision, device), device)}; CIFAR-shaped noise, "
        f"{images:,} images per epoch; K = {k} levels ({', '.join(map(str, levels))}).",
        "",
        "| work | s per epoch | against one training epoch |",
        "|---|---:|---:|",
    )
    t_train = median_seconds(masked_epoch, args.repeats, device)
    table.add(f"| masked training epoch (LTR's unit; a ticket's retraining one at a time) | {t_train:.2f} | 1.00 |")
    t_single = median_seconds(lambda: search_epoch(densities[-1]), args.repeats, device)
    table.add(f"| search epoch, one density | {t_single:.2f} | {t_single / t_train:.2f} |")
    t_search = median_seconds(lambda: search_epoch(densities), args.repeats, device)
    table.add(f"| batched search epoch, K = {k} | {t_search:.2f} | {t_search / t_train:.2f} "
              f"({t_search / (k * t_single):.2f} of K single epochs) |")
    t_retrain = median_seconds(retraining_epoch, args.repeats, device) if stacked else None
    table.add(f"| retraining epoch of the K tickets, stacked | {t_retrain:.2f} | {t_retrain / t_train:.2f} "
              f"({t_retrain / (k * t_train):.2f} of K single epochs) |" if stacked
              else f"| retraining epoch of the K tickets | {k * t_train:.2f} (one at a time: this network "
                   f"cannot be stacked) | {k:.2f} |")
    ltr = (max(levels) + 1) * (epochs - rewind) * t_train
    grid = ["",
            f"| whole grid (E = {epochs}, rewind {rewind}) | LTR, {max(levels) + 1} trainings | CTS batched "
            "| CTS one at a time | LTR / the faster CTS |",
            "|---|---:|---:|---:|---:|"]
    retrain_epochs = epochs - rewind
    for name, length in search_epochs.items():
        one_at_a_time = k * (length * t_single + retrain_epochs * t_train)
        together = length * t_search + retrain_epochs * (t_retrain if stacked else k * t_train)
        grid.append(f"| CTS-KL `{name}` ({length} search epochs) | {ltr / 3600:.2f} h | "
                    f"{together / 3600:.2f} h | {one_at_a_time / 3600:.2f} h | "
                    f"**{ltr / min(together, one_at_a_time):.1f}×** |")
    table.add(*grid)
    table.finish()

if __name__ == "__main__":
    main()
