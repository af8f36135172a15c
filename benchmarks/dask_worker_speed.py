"""Why the DaskRunner's LocalCluster unsets MALLOC_TRIM_THRESHOLD_: the same torch CPU training in
a plain process, and in a Dask worker with and without Dask's default 64 KiB trim threshold.

    python benchmarks/dask_worker_speed.py               # about a minute on 2 cores
    python benchmarks/dask_worker_speed.py --write-docs  # rewrite the `dask-worker` block of docs/performance.md

Each figure is the best of three runs of 8 epochs of the digits convnet at one torch thread
(the first run in a process pays one-off warm-up costs).
"""

from __future__ import annotations

import argparse
import os
import time


def train_once(epochs: int = 8) -> float:
    import torch

    from cts_pipeline.core.data.splits import load_splits
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.core.train.loop import train
    from cts_pipeline.core.train.recipe import TrainRecipe

    torch.set_num_threads(1)
    train_split, test_split = load_splits("digits", "data/01_raw", False)
    net = build_model("convnet", image_shape=train_split.info.image_shape, num_classes=10,
                      generator=torch.Generator().manual_seed(0))
    recipe = TrainRecipe(epochs=epochs, batch_size=64, lr=0.1, milestones=[], rewind_epoch=1)
    started = time.perf_counter()
    train(net, train_split, test_split, recipe, seed=0, stage="bench", progress=False)
    return time.perf_counter() - started


def in_cluster(trim: int | None) -> float:
    """Best of three in a one-worker LocalCluster of this project, with ``trim`` as the worker's
    MALLOC_TRIM_THRESHOLD_ (None: unset, as the project's cluster has it)."""
    from distributed import Client

    from cts_pipeline import runners

    key = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    saved = runners.CLUSTER_CONFIG[key]
    runners.CLUSTER_CONFIG[key] = trim
    try:
        with runners.local_cluster(1, 1) as cluster, Client(cluster) as client:
            return min(client.submit(train_once, pure=False).result() for _ in range(3))
    finally:
        runners.CLUSTER_CONFIG[key] = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    plain = min(train_once() for _ in range(3))
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    unset = in_cluster(None)
    trimmed = in_cluster(65536)
    text = "\n".join([
        "| where the training runs | s (best of 3) | against a plain process |",
        "|---|---:|---:|",
        f"| plain process | {plain:.2f} | 1.00 |",
        f"| Dask worker, MALLOC_TRIM_THRESHOLD_ unset (this project's LocalCluster) | {unset:.2f} | {unset / plain:.2f} |",
        f"| Dask worker, Dask's default MALLOC_TRIM_THRESHOLD_=65536 | {trimmed:.2f} | {trimmed / plain:.2f} |",
        "",
        f"8 epochs of the digits convnet at one torch thread, {os.cpu_count()} cores; "
        "`python benchmarks/dask_worker_speed.py --write-docs`.",
    ])
    print(text)
    if args.write_docs:
        from docs_blocks import replace_block

        replace_block("docs/performance.md", "dask-worker", text)


if __name__ == "__main__":
    main()
