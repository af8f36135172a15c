"""The whole grid against LTR per epoch of work (issue 8): ResNet-20 on CIFAR-shaped noise, in plain
PyTorch, so it runs where Kedro and MLflow are not installed (the GPU machine).

    PYTHONPATH=src python benchmarks/grid_epochs.py --device cuda --write-docs
    python benchmarks/grid_epochs.py --images 2048 --write-docs   # the CPU row (about 10 min, 2 cores)
    python benchmarks/grid_epochs.py --quick                       # checks the script in a minute

It times one epoch of each kind of work the grid needs (the median of --repeats after a warm-up
epoch), on the same weights and data, with the `cifar10_resnet20` preset's recipe (batch 512,
summed loss with clipping at 2.0, augmentation; fp16 on CUDA as the preset asks):
  - a masked training epoch: LTR's unit, since every level retrains from the rewind epoch;
  - a search epoch at one density, and CTS's batched search over the K grid densities (always
    fp32, as the search runs);
  - CTS's retraining of the K tickets stacked (fp16 with one loss scale per ticket on CUDA).

It then composes the whole grid from the preset's epoch counts (E = 160, rewind k = 9, levels 16–28):
LTR pays (L_max + 1) · (E − k) training epochs; CTS pays E_search search epochs (160 `long`, 20
`short`) and (E − k) retraining epochs. The dense training to θ_k and the test evaluations are
common to both sides and left out. CTS is costed both ways, batched and one at a time
(`runtime.batch_sparsities: auto` picks the faster), and the ratio uses the faster.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
from docs_blocks import BlockWriter
from speed import sync, synthetic

from cts_pipeline.core.cts import SearchConfig, concrete_search
from cts_pipeline.core.device.runtime import describe_hardware, resolve_device
from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.batched import supports as stacked_retraining_supported
from cts_pipeline.core.train.batched import train_tickets
from cts_pipeline.core.train.loop import train
from cts_pipeline.core.train.recipe import TrainRecipe

EPOCHS, REWIND = 160, 9  # the cifar10_resnet20 preset
LEVELS = (16, 18, 20, 22, 24, 26, 28)
SEARCH_EPOCHS = {"long": EPOCHS, "short": EPOCHS // 8}


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
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a small network (width 8) and 2 levels: checks the script")
    parser.add_argument("--write-docs", action="store_true", help="rewrite this device's block in docs/performance.md")
    args = parser.parse_args()
    if args.write_docs and args.quick:
        raise SystemExit("--quick checks the script; its figures say nothing and are not written")
    device = resolve_device(args.device)
    levels = LEVELS[-2:] if args.quick else LEVELS
    images = 256 if args.quick else args.images
    batch = 64 if args.quick else args.batch_size
    # Width 8, not 4: below 8 input channels the 1x1 strided shortcut's NHWC backward corrupts
    # memory on AVX2 CPUs (core.device.runtime.channels_last_hazard), and --quick is run on CPUs.
    options = {"width": 8} if args.quick else {}
    split = synthetic("cifar10", images, device)
    recipe = TrainRecipe(epochs=1, batch_size=batch, lr=0.1, weight_decay=1e-3, loss_reduction="sum",
                         grad_clip_norm=2.0, augment=True, precision="fp16" if device.type == "cuda" else "fp32")
    channels_last = True

    def fresh():
        return build_model("resnet20", image_shape=split.info.image_shape, num_classes=split.info.num_classes,
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
        concrete_search(theta, split, density=density, config=SearchConfig(epochs=1), recipe=recipe, seed=0,
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
        f"{datetime.date.today()}, {describe_hardware(device)}. ResNet-20{' (width 8)' if args.quick else ''}, "
        f"CIFAR-shaped noise, {images:,} images per epoch, batch {batch}, training in {recipe.precision}"
        f"{'' if device.type == 'cuda' else ' (a CPU always trains in fp32)'}; K = {k} levels "
        f"({', '.join(map(str, levels))}).",
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
              else "| retraining epoch of the K tickets, stacked | — (the recipe cannot be stacked) | — |")
    ltr = (max(levels) + 1) * (EPOCHS - REWIND) * t_train
    grid = ["",
            f"| whole grid (E = {EPOCHS}, rewind {REWIND}) | LTR, {max(levels) + 1} trainings | CTS batched "
            "| CTS one at a time | LTR / the faster CTS |",
            "|---|---:|---:|---:|---:|"]
    retrain_epochs = EPOCHS - REWIND
    for name, search_epochs in SEARCH_EPOCHS.items():
        one_at_a_time = k * (search_epochs * t_single + retrain_epochs * t_train)
        together = search_epochs * t_search + retrain_epochs * (t_retrain if stacked else k * t_train)
        grid.append(f"| CTS-KL `{name}` ({search_epochs} search epochs) | {ltr / 3600:.2f} h | "
                    f"{together / 3600:.2f} h | {one_at_a_time / 3600:.2f} h | "
                    f"**{ltr / min(together, one_at_a_time):.1f}×** |")
    table.add(*grid)
    table.finish()

if __name__ == "__main__":
    main()
