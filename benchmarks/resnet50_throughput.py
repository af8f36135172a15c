"""ResNet-50 training throughput on synthetic ImageNet-shaped batches (issue 12's GPU rows).

Images/s and peak device memory of the project's training loop (``core.train.loop.train``) in fp32
(TF32 matmuls and convolutions, as the pipeline's CUDA policy sets them), bf16 and fp16, with
channels_last on and off. (What several GPUs cost in communication is benchmarks/distributed.py's;
with one process the loop never wraps the model in DDP, so there is no one-GPU DDP row.) Plain
PyTorch only, so it runs on the device machine without Kedro:

    PYTHONPATH=src python benchmarks/resnet50_throughput.py --device cuda             # about 3 min on an H200
    PYTHONPATH=src python benchmarks/resnet50_throughput.py --device cuda --write-docs
    python benchmarks/resnet50_throughput.py --quick   # a seconds-long check of the script on a CPU

Each row trains 3 epochs of ``--steps`` steps on the same random uint8 images (kept on the
device, as the in-memory path does) and reports the median images/s of the epochs after the
first, which warms up cuDNN's algorithm search and the allocator.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics

import torch
from docs_blocks import BlockWriter

from cts_pipeline.core.data.registry import DATASETS
from cts_pipeline.core.data.splits import Split
from cts_pipeline.core.device.runtime import describe_hardware, precision_label, training_device
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.loop import train
from cts_pipeline.core.train.recipe import TrainRecipe


def images_per_second(model_name: str, size: int, batch: int, steps: int, device: torch.device, precision: str,
                      channels_last: bool) -> tuple[float, float | None]:
    """Images/s of the training loop, and its peak device memory in GiB (CUDA; else None)."""
    info = dataclasses.replace(DATASETS["imagenet"], image_shape=(3, size, size))
    generator = torch.Generator().manual_seed(0)
    n = batch * steps
    images = torch.randint(0, 256, (n, 3, size, size), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 1000, (n,), generator=generator)
    split = Split(images, labels, info).to(device)
    model = build_model(model_name, image_shape=info.image_shape, num_classes=1000,
                        generator=torch.Generator().manual_seed(1)).to(device)
    recipe = TrainRecipe(epochs=3, batch_size=batch, lr=0.1, precision=precision, loss_reduction="sum",
                         grad_clip_norm=2.0)
    on_cuda = split.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(split.device)
    history = train(model, split, None, recipe, seed=0, stage="throughput", channels_last=channels_last,
                    progress=False).history
    peak = torch.cuda.max_memory_allocated(split.device) / 2**30 if on_cuda else None
    return n / statistics.median(r["seconds"] for r in history[1:]), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="ResNet-18 at 64 px, batch 8: checks the script")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    model, size = ("resnet18", 64) if args.quick else ("resnet50", 224)
    batch, steps = (8, 2) if args.quick else (args.batch, args.steps)
    if args.write_docs and args.quick:
        raise SystemExit("--quick checks the script; its figures say nothing and are not written")
    device = training_device(args.device)
    on_cuda = device.type == "cuda"
    table = BlockWriter("docs/performance.md", "resnet50", to_docs=args.write_docs)
    table.add(f"`python benchmarks/resnet50_throughput.py --device {args.device}`, {datetime.date.today()}, "
              f"{describe_hardware(device)}. {model}, {size}x{size} synthetic images, "
              f"batch {batch}, summed loss with clipping; fp16 with its gradient scaler and fused SGD.", "",
              "| run | images/s | against fp32 NCHW | peak memory |", "|---|---|---|---|")
    speeds: dict[str, float] = {}

    def add(label: str, measured: tuple[float, float | None]) -> None:
        speed, peak = measured
        speeds[label] = speed
        baseline = next(iter(speeds.values()))  # the first row: fp32 (TF32 on CUDA), NCHW
        table.add(f"| {label} | {speed:.0f} | {speed / baseline:.2f} | "
                  f"{f'{peak:.1f} GiB' if peak is not None else '—'} |")

    for precision in ("fp32", "bf16", "fp16") if on_cuda else ("fp32",):
        for channels_last in (False, True):
            add(f"{precision_label(precision, device)}, {'channels_last' if channels_last else 'NCHW'}",
                images_per_second(model, size, batch, steps, device, precision, channels_last))
    table.finish()

if __name__ == "__main__":
    main()
