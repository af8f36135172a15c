"""Batched CTS search (K densities on one θ_k in one pass) against K single searches, one after
the other, and K tickets retrained stacked against K retrainings: the wall-clock ratios, measured
side by side in one process (issue 8).

    python benchmarks/batched.py                         # CPU rows (about 5 min on 2 cores)
    python benchmarks/batched.py --mnist ../shared/data  # LeNet-300-100 on the real MNIST images
    PYTHONPATH=src python benchmarks/batched.py --device cuda --resnet   # GPU: ResNet-20, K = 5 and 15

Every row runs both sides on the same frozen weights, data order and noise, interleaved, and
reports the median of the per-repeat ratios batched / sequential (targets: <= 0.5 on the default
convnet/digits, <= 0.7 on LeNet-300-100/MNIST). It also reports how many mask entries differ
between the two sides (float rounding only; see tests/core/test_batched_search.py), which path
the batched rows took (stacked, or vmap where the stacked layout failed its check; micro-batches
where device memory cut the batch), the retraining's precision, and the batched side's peak
device memory (CUDA).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
from docs_blocks import BlockWriter
from speed import sync, synthetic

from cts_pipeline.core.cts import SearchConfig, batch_statistics, concrete_search
from cts_pipeline.core.data.splits import Split, load_splits
from cts_pipeline.core.device.runtime import describe_hardware, training_device
from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.batched import train_tickets
from cts_pipeline.core.train.loop import effective_precision, to_layout, train
from cts_pipeline.core.train.recipe import TrainRecipe

LEVELS = (10, 14, 18, 22, 24)  # the default grid: 89.26 ... 99.53 %


def side_by_side(sequential, batched, repeats: int, device: torch.device):
    """Median seconds of each side and of the per-repeat ratios batched / sequential, interleaved,
    with the last result of each side."""
    batched()  # warm-up (first-call allocations, the stacked-forward check)
    times_seq, times_bat, ratios = [], [], []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        one = sequential()
        sync(device)
        times_seq.append(time.perf_counter() - started)
        started = time.perf_counter()
        together = batched()
        sync(device)
        times_bat.append(time.perf_counter() - started)
        ratios.append(times_bat[-1] / times_seq[-1])
    return statistics.median(times_seq), statistics.median(times_bat), statistics.median(ratios), one, together


def batching_headroom(net: torch.nn.Module, split: Split, batch: int, rows: int, device: torch.device,
                      channels_last: bool, repeats: int) -> float:
    """How much of the students' network work batching K rows could save on this hardware at best:
    the network's forward and backward on one K-times larger batch, against K of them on batches of
    B (the median over ``repeats``; BatchNorm in batch-statistics mode, as in the search). One larger
    batch is the most a K-row pass can gain, and only shared weights allow it; near 1 the hardware
    is already saturated at batch B, and only the work the rows share (the teacher, the noise draw)
    can be saved."""
    net = net.to(memory_format=torch.channels_last) if channels_last else net
    images = to_layout(split.normalized()[: rows * batch].to(device), channels_last)

    def seconds(n: int, calls: int = 20) -> float:
        net(images[:n]).sum().backward()
        sync(device)
        started = time.perf_counter()
        for _ in range(calls):
            net(images[:n]).sum().backward()
        sync(device)
        return (time.perf_counter() - started) / calls

    with batch_statistics(net):
        ratios = [seconds(rows * batch) / (rows * seconds(batch)) for _ in range(repeats)]
    net.zero_grad(set_to_none=True)
    return statistics.median(ratios)


def measure(label: str, model: str, options: dict, split: Split, recipe: TrainRecipe, densities: list[float],
            device: torch.device, repeats: int, channels_last: bool, headroom: bool = False) -> str:
    """The table's line for a batched search against one search per density."""
    info = split.info
    net = build_model(model, image_shape=info.image_shape, num_classes=info.num_classes,
                      generator=torch.Generator().manual_seed(0), **options).to(device)
    config = SearchConfig()

    def sequential():
        return [concrete_search(net, split, density=k, config=config, recipe=recipe, seed=0, progress=False,
                                channels_last=channels_last) for k in densities]

    def batched():
        return concrete_search(net, split, density=densities, config=config, recipe=recipe, seed=0,
                               progress=False, channels_last=channels_last)

    t_seq, t_bat, ratio, singles, rows = side_by_side(sequential, batched, repeats, device)
    peak = peak_memory(batched, device)
    differ, kept = swapped(densities, singles, rows)
    agreement = f"{differ} of {kept} kept weights swapped"
    if device.type == "cpu":
        # The yardstick: the plain search against itself on another thread count (float rounding only).
        other, threads = on_other_threads(sequential)
        agreement += f" (one at a time, {threads}: {swapped(densities, singles, other)[0]})"
    bound = (f"{batching_headroom(net, split, recipe.batch_size, len(densities), device, channels_last, repeats):.2f}"
             if headroom else "—")
    path = rows[0].forward_path + (f" / {rows[0].micro_batches} micro-batches" if rows[0].micro_batches > 1 else "")
    return (f"| {label} | K = {len(densities)} | {path} | {t_seq:.2f} s | {t_bat:.2f} s | **{ratio:.2f}** | {bound} | "
            f"{peak} | {agreement} |")


def peak_memory(run, device: torch.device) -> str:
    """The most device memory ``run()`` holds at once (CUDA; "—" on a CPU, which has no such counter)."""
    if device.type != "cuda":
        return "—"
    peaks = []
    reset = torch.cuda.reset_peak_memory_stats

    def keeping_the_peak(*args, **kwargs):  # the search's memory probe resets the counter mid-run
        peaks.append(torch.cuda.max_memory_allocated(device))
        reset(*args, **kwargs)

    sync(device)
    reset(device)
    torch.cuda.reset_peak_memory_stats = keeping_the_peak
    try:
        run()
        sync(device)
    finally:
        torch.cuda.reset_peak_memory_stats = reset
    return f"{max([*peaks, torch.cuda.max_memory_allocated(device)]) / 2**30:.2f} GiB"


def on_other_threads(run):
    """``run()`` on another CPU thread count, and a label saying which two counts are compared."""
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    torch.set_num_threads(other)
    try:
        return run(), f"{threads} vs {other} threads"
    finally:
        torch.set_num_threads(threads)


def swapped(densities, a_side, b_side) -> tuple[int, int]:
    """Kept weights that differ between two sides' masks (each swap counted once), and kept in all."""
    differ = kept = 0
    for k, a, b in zip(densities, a_side, b_side, strict=True):
        ma, mb = global_topk_mask(a.scores, k), global_topk_mask(b.scores, k)
        differ += sum(int((ma[n] != mb[n]).sum()) for n in ma) // 2
        kept += sum(int(m.sum()) for m in ma.values())
    return differ, kept


def measure_retraining(label: str, model: str, split: Split, test: Split, recipe: TrainRecipe, densities: list[float],
                       device: torch.device, repeats: int, channels_last: bool, headroom: bool = False, options: dict | None = None) -> str:
    """The table's line for K tickets retrained stacked against one at a time."""
    info = split.info

    def fresh():
        return build_model(model, image_shape=info.image_shape, num_classes=info.num_classes, **(options or {}),
                           generator=torch.Generator().manual_seed(0)).to(device)

    g = torch.Generator().manual_seed(1)
    masks = [global_topk_mask({n: torch.rand(w.shape, generator=g) for n, w in prunable_parameters(fresh()).items()}, k)
             for k in densities]

    def sequential():
        out = []
        for mask in masks:
            net = fresh()
            out.append(train(net, split, test, recipe, seed=0, stage="one", mask=mask, progress=False,
                             channels_last=channels_last).final["test_accuracy"])
        return out

    def batched():
        _, results = train_tickets(fresh(), masks, split, test, recipe, seed=0, stage="stacked", progress=False,
                                   channels_last=channels_last)
        return [r.final["test_accuracy"] for r in results]

    t_seq, t_bat, ratio, one, stacked = side_by_side(sequential, batched, repeats, device)
    peak = peak_memory(batched, device)
    gap = max(abs(a - b) for a, b in zip(one, stacked, strict=True))
    agreement = f"largest test-accuracy gap {gap:.2f} points"
    if device.type == "cpu":  # the yardstick, as for the search: one at a time on another thread count
        other, threads = on_other_threads(sequential)
        agreement += f" (one at a time, {threads}: {max(abs(a - b) for a, b in zip(one, other, strict=True)):.2f})"
    bound = (f"{batching_headroom(fresh(), split, recipe.batch_size, len(densities), device, channels_last, repeats):.2f}"
             if headroom else "—")
    precision = effective_precision(recipe.precision, device)
    return (f"| retraining: {label} | K = {len(densities)} | stacked, {precision} | {t_seq:.2f} s | {t_bat:.2f} s | "
            f"**{ratio:.2f}** | {bound} | {peak} | {agreement} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mnist", type=Path, help="root of the real MNIST files (else MNIST-shaped noise)")
    parser.add_argument("--resnet", action="store_true", help="ResNet-20 on CIFAR-shaped noise, batch 512")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/performance.md")
    parser.add_argument("--quick", action="store_true", help="every row at toy sizes: checks the script")
    args = parser.parse_args()
    if args.write_docs and args.quick:
        raise SystemExit("--quick checks the script; its figures say nothing and are not written")
    device = training_device(args.device)
    repeats = 1 if args.quick else args.repeats
    # toy sizes: images per split, the ResNet-20 batch and width
    mnist_images, cifar_images, resnet_batch, resnet = ((1024, 64, 64, {"width": 8}) if args.quick
                                                        else (60_000, 10_240, 512, {}))
    densities = [0.8 ** L for L in LEVELS]
    # The CPU table and a GPU's live side by side: each device writes its own block.
    table = BlockWriter("docs/performance.md", "batched" if device.type == "cpu" else f"batched-{device.type}",
                        to_docs=args.write_docs)
    table.add(f"Hardware: {describe_hardware(device)}; "
              f"`python benchmarks/batched.py{' --mnist' if args.mnist else ''}"
              f"{f' --device {device.type}' if device.type != 'cpu' else ''}{' --resnet' if args.resnet else ''}"
              f"{f' --repeats {args.repeats}' if args.repeats != 3 else ''}`, {datetime.date.today()}.\n",
              "| network and data | tickets | batched path | one at a time | batched | ratio | one K·B batch / K "
              "batches of B | batched peak memory | agreement |",
              "|---|---|---|---|---|---|---|---|---|")

    def small_networks() -> None:
        digits, digits_test = (s.to(device) for s in load_splits("digits"))
        if args.quick:
            digits = digits.subset(256)
        table.add(measure("convnet (56,224 weights), digits, batch 64, 3 search epochs", "convnet", {}, digits,
                          TrainRecipe(epochs=3, batch_size=64, lr=0.1), densities, device, repeats,
                          channels_last=True, headroom=not args.quick))
        mnist = (load_splits("mnist", args.mnist)[0] if args.mnist else synthetic("mnist", mnist_images, "cpu")).to(device)
        source = "MNIST" if args.mnist else "MNIST-shaped noise"
        table.add(measure(f"LeNet-300-100 (266,200 weights), {source}, batch 128, 1 search epoch", "lenet_300_100",
                          {}, mnist, TrainRecipe(epochs=1, batch_size=128, lr=0.1), densities, device, repeats,
                          channels_last=False))
        table.add(measure_retraining("convnet, digits, batch 64, 3 epochs", "convnet", digits, digits_test,
                                     TrainRecipe(epochs=3, batch_size=64, lr=0.1), densities, device, repeats,
                                     True, headroom=not args.quick))
        table.add(measure_retraining("LeNet-300-100, " + source + ", batch 128, 1 epoch", "lenet_300_100", mnist,
                                     mnist.subset(2000), TrainRecipe(epochs=1, batch_size=128, lr=0.1), densities,
                                     device, repeats, False))

    def resnet20() -> None:
        cifar = synthetic("cifar10", cifar_images, device)
        for k in (5, 15):
            grid = [0.8 ** L for L in (16, 18, 20, 22, 24)] * (k // 5)
            table.add(measure(f"ResNet-20 (270,896 weights), CIFAR-shaped noise, batch {resnet_batch}, 1 search epoch "
                              f"({cifar_images:,} images)", "resnet20", resnet, cifar,
                              TrainRecipe(epochs=1, batch_size=resnet_batch, lr=0.1),
                              grid, device, repeats, channels_last=True, headroom=not args.quick))
        for k in (5, 15):  # stacked retraining in the default precision (bf16 on a recent GPU)
            grid = [0.8 ** L for L in (16, 18, 20, 22, 24)] * (k // 5)
            table.add(measure_retraining(f"ResNet-20, CIFAR-shaped noise, batch {resnet_batch}, 1 epoch "
                                         f"({cifar_images:,} images)", "resnet20", cifar, cifar.subset(128),
                                         TrainRecipe(epochs=1, batch_size=resnet_batch, lr=0.1), grid, device,
                                         repeats, True, options=resnet))

    # ResNet-20 first when asked for: it is what a GPU run is for, and a time limit cuts the end.
    for rows in (resnet20, small_networks) if args.resnet else (small_networks,):
        rows()
    table.finish()


if __name__ == "__main__":
    main()
