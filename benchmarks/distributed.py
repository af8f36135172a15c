"""The multi-process path on CPU: one dense training of LeNet-300-100 on MNIST-shaped synthetic data,
in one process (2 torch threads) against 2 gloo processes (1 thread each) under
``core.device.distributed.launch``. Per-epoch training time (the loop only) and end to end (with the
processes' start-up). No GPU here: the GPU rows of issue 12 (ResNet-50 images/s in fp32 and
bf16, channels_last, one process against ``nproc: 1`` under DDP) need a device.

    python benchmarks/distributed.py                # about 2 min on 2 CPU cores
    python benchmarks/distributed.py --write-docs   # also rewrite the block in docs/performance.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
from docs_blocks import replace_block

from cts_pipeline.core.data.registry import DATASETS
from cts_pipeline.core.data.splits import Split
from cts_pipeline.core.device.distributed import launch, rank_and_world
from cts_pipeline.core.device.runtime import describe_hardware
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.loop import train
from cts_pipeline.core.train.recipe import TrainRecipe

RECIPE = TrainRecipe(epochs=4, batch_size=128, lr=0.1, eval_every=4)


def run(threads: int) -> tuple[list[float], float, int]:
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12_800, 1, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (12_800,), generator=generator)
    split = Split(images, labels, DATASETS["mnist"])
    model = build_model("lenet_300_100", image_shape=(1, 28, 28), num_classes=10,
                        generator=torch.Generator().manual_seed(1))
    result = train(model, split, None, RECIPE, seed=0, stage="bench", progress=False)
    return [r["seconds"] for r in result.history], float(result.history[-1]["train_loss"]), rank_and_world()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    rows = []
    for label, call in (("one process, 2 threads", lambda: run(2)),
                        ("2 gloo processes, 1 thread each", lambda: launch(run, 2, 1, backend="gloo"))):
        started = time.perf_counter()
        epochs, loss, world = call()
        total = time.perf_counter() - started
        per_epoch = statistics.median(epochs[1:])  # the first epoch warms up
        rows.append((label, world, per_epoch, total, loss))
        print(f"{label}: {per_epoch:.2f} s per epoch, {total:.1f} s end to end, last loss {loss:.5f}", flush=True)
    base = rows[0][2]
    lines = [f"`python benchmarks/distributed.py --write-docs`, {datetime.date.today()}, "
             f"{describe_hardware(torch.device('cpu'))}. LeNet-300-100, 12,800 MNIST-shaped images, batch 128, "
             f"{RECIPE.epochs} epochs.", "",
             "| run | processes | s per epoch (median after the first) | against one process | end to end s | last-epoch loss |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {world} | {per_epoch:.2f} | **{per_epoch / base:.2f}** | {total:.1f} | {loss:.5f} |"
              for label, world, per_epoch, total, loss in rows]
    print("\n".join(lines))
    if args.write_docs:
        replace_block("docs/performance.md", "distributed", "\n".join(lines))


if __name__ == "__main__":
    main()
