"""Speed ratios, each measured side by side in this one process (never a timed assertion in a test).

    python benchmarks/speed.py                       # all rows (about 20 min on 2 CPU cores)
    python benchmarks/speed.py --quick               # rows 1-3 and 6 at toy sizes: checks the script
    python benchmarks/speed.py --mnist ../shared/data

Rows:
  1. the project's training loop vs a minimal hand-written PyTorch loop (same model, data, batch);
     ratio = hand-written time / project time, target >= 0.95;
  2. a CTS search step vs a dense training step on the same batch (ResNet-20: target <= 1.5);
  3. the device-resident batched data path vs a torchvision DataLoader with per-sample transforms;
  4. end-to-end CTS-KL vs end-to-end LTR to 99.26 % sparsity, MNIST LeNet-300-100 (needs --mnist);
  5. the default `kedro run --pipelines=cts` wall-clock vs the sum of its nodes' compute;
  6. the `cifar10_resnet20` preset's training and search steps as the preset runs them (its
     precision, 4 virtual ranks, its BatchNorm options; conf/ read by presets.py), against the same
     steps with one rank in the default precision (bf16 on a recent GPU).
Rows 1 and 2 compare two sides at the same arithmetic: the project's loop in its default precision
against a hand-written loop under the same autocast; fp32 is labelled with what TF32 does to it.
Timings interleave the two sides and report the median of repeated ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from cts_pipeline.core import cts as C
from cts_pipeline.core.data.registry import DATASETS
from cts_pipeline.core.data.splits import Split, iterate_batches, load_splits
from cts_pipeline.core.data.transforms import normalize
from cts_pipeline.core.device.runtime import (
    UniformNoise,
    describe_hardware,
    generator,
    precision_label,
    synchronize,
    training_device,
)
from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.train.loop import autocast_for, effective_precision, train
from cts_pipeline.core.train.recipe import TrainRecipe

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SpeedTable:
    """This run's measured lines, and the ``speed-<device>`` block of docs/performance.md they go to.
    With ``to_docs`` each line is written as soon as it is measured, so a part that its time limit
    in gpu.sh stops keeps what it measured (``docs_blocks.PARTIAL``)."""

    device: torch.device
    to_docs: bool = False
    doc: str = "docs/performance.md"
    rows: list[tuple[int, str, str, str, str, str]] = field(default_factory=list)  # (row, what, measured,
    #                                                                                  ratio, target, met)

    def add(self, number: int, what: str, measured: str, ratio: str, target: str, met: bool | None) -> None:
        """One measured line; ``met`` is None where the target is a figure to report, not a bound."""
        verdict = "—" if met is None else ("yes" if met else "no")
        self.rows.append((number, what, measured, ratio, target, verdict))
        print(f"{number}. {what}: {measured} -> {ratio} ({target}; met: {verdict})", flush=True)
        if self.to_docs:
            self.write(partial=True)

    def write(self, partial: bool = False) -> None:
        """The measured rows into the block. Rows not measured in this run keep their earlier lines
        (each line carries its own date), so ``--rows 1`` re-measures row 1 alone. While ``partial``,
        a row's lines that this run has not reached yet stay too, and a fresh line takes the place
        of the earlier line of the same measurement."""
        from docs_blocks import read_block, replace_block

        name = f"speed-{self.device.type}"
        today = datetime.date.today()
        fresh = {what: f"| {number} | {what} | {times} | **{ratio}** | {target} | {met} | {today} |"
                 for number, what, times, ratio, target, met in self.rows}
        rows = {number for number, *_ in self.rows}
        lines = []
        for line in read_block(self.doc, name).splitlines():
            cells = line.split("|")
            if not (line.startswith("| ") and cells[1].strip().isdigit()):
                continue  # the header
            what = cells[2].strip()
            if partial and what in fresh:
                lines.append(fresh.pop(what))
            elif int(cells[1]) not in rows or (partial and what not in fresh):
                lines.append(line)
        lines += fresh.values()  # in the order measured
        lines.sort(key=lambda line: int(line.split("|")[1]))  # stable: a row's lines keep their order
        replace_block(self.doc, name, "\n".join([
            f"Hardware: {describe_hardware(self.device)}. Written by `python benchmarks/speed.py --write-docs`"
            " (or `--rows N` for some rows); each line's last column says when it was measured.",
            "",
            "| # | measurement | times | ratio | target | met | measured |",
            "|---|---|---|---|---|---|---|",
            *lines,
        ]), partial=partial)


LABELS = {"lenet_300_100": "LeNet-300-100", "resnet20": "ResNet-20", "vgg16": "VGG-16"}


sync = synchronize  # the other benchmarks import it from here


def interleaved(a, b, repeats: int, device: torch.device) -> tuple[float, float, float]:
    """Median seconds of a and b, and the median of the per-repeat ratios b/a."""
    ta, tb, ratios = [], [], []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a()
        sync(device)
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b()
        sync(device)
        tb.append(time.perf_counter() - t)
        ratios.append(tb[-1] / ta[-1])
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def synthetic(name: str, n: int, device: torch.device) -> Split:
    info = DATASETS[name]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *info.image_shape), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, info.num_classes, (n,), generator=g)
    return Split(images=images, labels=labels, info=info).to(device)


# --------------------------------------------------------------------------------------------
# 1. training loop vs hand-written loop


def loop_ratio(table: SpeedTable, name: str, split: Split, batch: int, device: torch.device, channels_last: bool,
               repeats: int) -> None:
    recipe = TrainRecipe(epochs=1, batch_size=batch, lr=0.01, weight_decay=1e-4)
    precision = effective_precision(recipe.precision, device)  # both sides: bf16 on a recent GPU
    autocast = autocast_for(precision, device)
    shape = split.info.image_shape
    x_all = normalize(split.images, split.info)
    if channels_last:
        x_all = x_all.contiguous(memory_format=torch.channels_last)

    def fresh():
        net = build_model(name, image_shape=shape, num_classes=split.info.num_classes,
                          generator=torch.Generator().manual_seed(0)).to(device)
        return net.to(memory_format=torch.channels_last) if channels_last else net

    def project():
        train(fresh(), split, None, recipe, seed=0, stage="bench", channels_last=channels_last, progress=False)

    def hand_written():  # the minimal loop: pre-normalised data, index, step
        net = fresh()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        perm = torch.randperm(len(split), generator=generator(device, 0, "bench"), device=device)
        for i in range(0, len(split), batch):
            idx = perm[i:i + batch]
            with autocast():
                loss = F.cross_entropy(net(x_all[idx]).float(), split.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    project()
    hand_written()
    t_project, t_hand, ratio = interleaved(project, hand_written, repeats, device)
    table.add(1, f"speed of the project training loop / of a hand-written loop, {LABELS[name]}{' NHWC' if channels_last else ''}, "
        f"{len(split):,} images, batch {batch}, both {precision_label(precision, device)}",
        f"{t_project:.2f} s vs {t_hand:.2f} s per epoch", f"{ratio:.2f}", "≥ 0.95", ratio >= 0.95)


# --------------------------------------------------------------------------------------------
# 2. search step vs dense step


def step_ratio(table: SpeedTable, name: str, shape, batch: int, device: torch.device, channels_last: bool, repeats: int,
               steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def fresh():
        net = build_model(name, image_shape=shape, num_classes=10, generator=torch.Generator().manual_seed(0)).to(device)
        return net.to(memory_format=torch.channels_last) if channels_last else net

    dense_net = fresh()
    opt = torch.optim.SGD(dense_net.parameters(), lr=0.01, momentum=0.9)

    def dense():
        for _ in range(steps):
            loss = F.cross_entropy(dense_net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    search_net = fresh()
    for p in search_net.parameters():
        p.requires_grad_(False)
    density = 0.0074
    relaxation = C.ConcreteMask(prunable_parameters(search_net), density)
    balancer = C.GradBalance(density, relaxation.num_weights)
    adam = torch.optim.Adam([relaxation.logits], lr=0.1, fused=True)
    noise = UniformNoise(device, 0, "bench-noise")
    norms = C.batch_statistics(search_net)
    norms.__enter__()

    objective = C.OBJECTIVES["kl"]

    def search():  # the search's own step function
        for _ in range(steps):
            C.search_step(search_net, relaxation, objective, balancer, adam, noise, x, y)

    dense()
    search()
    t_dense, t_search, ratio = interleaved(dense, search, repeats, device)
    d = relaxation.num_weights
    convolutional = name in ("resnet20", "vgg16")
    memory = f"; peak {peak_gib(search, device)} vs {peak_gib(dense, device)}" if device.type == "cuda" else ""
    table.add(2, f"CTS search step / dense training step, {LABELS[name]}{' NHWC' if channels_last else ' NCHW' if convolutional else ''} "
        f"({d:,} logits), batch {batch}, {precision_label('fp32', device)}",
        f"{t_search / steps * 1e3:.1f} ms vs {t_dense / steps * 1e3:.1f} ms{memory}", f"{ratio:.2f}",
        "≤ 1.5 (floor ≈ 1.33)" if convolutional else "below the straightforward 2.6–2.8",
        ratio <= 1.5 if convolutional else ratio < 2.6)


def peak_gib(run, device: torch.device) -> str:
    """The most device memory ``run()`` holds at once, in GiB (CUDA only)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    sync(device)
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


# --------------------------------------------------------------------------------------------
# 6. the ResNet-20 preset's steps as the preset runs them


def preset_steps(table: SpeedTable, device: torch.device, images: int, batch: int, repeats: int,
                 width: int | None = None) -> None:
    """The training and search steps of ``cifar10_resnet20`` as its conf/ files set them (precision,
    virtual ranks, BatchNorm options, loss, clipping, augmentation), each against the same step with
    one rank in the default precision: what the preset's recipe costs beyond the plain step."""
    from presets import preset

    paper = preset("cifar10_resnet20")
    options = {**paper.model_options, **({"width": width} if width else {})}
    split = synthetic(paper.dataset, images, device)
    as_preset = replace(paper.recipe, epochs=1, batch_size=batch, rewind_epoch=0, milestones=())
    one_rank = replace(as_preset, virtual_ranks=1, precision="auto")
    steps = -(-images // batch)

    def fresh():
        return build_model(paper.model, image_shape=split.info.image_shape, num_classes=split.info.num_classes,
                           generator=torch.Generator().manual_seed(0), **options).to(device)

    def training(recipe):
        net = fresh()
        return lambda: train(net, split, None, recipe, seed=0, stage="preset step", channels_last=True,
                             progress=False)

    theta = fresh()

    def search(recipe):
        return lambda: C.concrete_search(theta, split, density=paper.densities[3], config=replace(paper.search, epochs=1),
                                         recipe=recipe, seed=0, channels_last=True, progress=False)

    labels = {recipe: precision_label(effective_precision(recipe.precision, device), device)
              for recipe in (as_preset, one_rank)}
    for what, plain, preset_side in (("training", training(one_rank), training(as_preset)),
                                     ("search", search(one_rank), search(as_preset))):
        plain(), preset_side()  # warm-up: allocations, cuDNN's algorithm choice
        t_plain, t_preset, ratio = interleaved(plain, preset_side, repeats, device)
        arithmetic = (f"{labels[as_preset]}, 4 virtual ranks / one rank, {labels[one_rank]}" if what == "training"
                      else "fp32 logits, 4 virtual ranks / one rank")
        table.add(6, f"{what} step as the cifar10_resnet20 preset runs it / the plain step: ResNet-20"
                     f"{f' (width {width})' if width else ''} ({', '.join(f'{k} {v}' for k, v in paper.model_options.items())}), "
                     f"batch {batch}, {arithmetic}",
                  f"{t_preset / steps * 1e3:.1f} ms vs {t_plain / steps * 1e3:.1f} ms per step", f"{ratio:.2f}",
                  "report", None)


# --------------------------------------------------------------------------------------------
# 3. batched device data path vs DataLoader with per-sample transforms


def data_path_ratio(table: SpeedTable, device: torch.device, n: int, repeats: int) -> None:
    from PIL import Image
    from torchvision import transforms

    split = synthetic("cifar10", n, device)
    cpu_images = split.images.cpu().permute(0, 2, 3, 1).numpy()
    labels = split.labels.cpu()
    info = split.info
    pipeline = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(info.mean, info.std),
    ])

    class PerSample(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return pipeline(Image.fromarray(cpu_images[i])), labels[i]

    loader = torch.utils.data.DataLoader(PerSample(), batch_size=128, shuffle=True, num_workers=0)

    def ours():
        for _batch in iterate_batches(split, 128, shuffle=True, generator=generator(device, 0, "b"), augment=True):
            pass

    def dataloader():
        for images, labels in loader:
            images.to(device)
            labels.to(device)

    t_ours, t_loader, ratio = interleaved(ours, dataloader, repeats, device)
    table.add(3, f"`DataLoader` with per-sample PIL transforms / batched on-device path, CIFAR-shaped, {n:,} images, "
        "crop + flip", f"{t_loader:.2f} s vs {t_ours:.3f} s per epoch", f"{ratio:.1f}× faster", "report", None)


# --------------------------------------------------------------------------------------------
# 4. end-to-end CTS-KL vs LTR to 99.26 % on MNIST, LeNet-300-100


def cts_vs_ltr(table: SpeedTable, root: Path, device: torch.device) -> None:
    from cts_pipeline.core.prune.ltr import level_for_sparsity, lottery_ticket_rewinding

    train_split, test_split = (s.to(device) for s in load_splits("mnist", root))
    recipe = TrainRecipe(epochs=20, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
                         milestones=[10, 15], rewind_epoch=1)
    sparsity, k = 0.9926, 1

    def fresh(state=None):
        net = build_model("lenet_300_100", image_shape=(1, 28, 28), num_classes=10,
                          generator=generator("cpu", 0, "model-init"))
        if state is not None:
            net.load_state_dict(state)
        return net.to(device)

    dense = fresh()
    dense_run = train(dense, train_split, test_split, recipe, seed=0, stage="dense", snapshot_epochs={k},
                      progress=False)
    theta_k = dense_run.snapshots[k]
    to_rewind = dense_run.seconds_until(k)

    search = C.concrete_search(fresh(theta_k), train_split, density=1 - sparsity, config=C.SearchConfig(),
                               recipe=recipe, seed=0, progress=False)
    cts_mask = global_topk_mask(search.scores, 1 - sparsity)
    cts_ticket = train(fresh(theta_k), train_split, test_split, recipe, seed=0, stage="cts", start_epoch=k,
                       mask=cts_mask, progress=False)
    cts_total = to_rewind + search.seconds + cts_ticket.seconds

    level = level_for_sparsity(sparsity)
    masks, records = lottery_ticket_rewinding(
        lambda: fresh(theta_k), dict(dense.state_dict()), train_split, test_split, recipe, seed=0,
        max_level=level, start_epoch=k, dense_seconds=dense_run.seconds, keep_levels={level}, progress=False,
    )
    ltr_ticket = train(fresh(theta_k), train_split, test_split, recipe, seed=0, stage="ltr", start_epoch=k,
                       mask=masks[level], progress=False)
    ltr_total = records[-1].cumulative_seconds + ltr_ticket.seconds
    table.add(4, "LTR end-to-end / CTS-KL end-to-end to 99.26 %, MNIST LeNet-300-100",
        f"LTR {ltr_total:.0f} s ({ltr_ticket.final['test_accuracy']:.2f} %) vs CTS-KL long {cts_total:.0f} s "
        f"({cts_ticket.final['test_accuracy']:.2f} %)", f"{ltr_total / cts_total:.1f}×", "paper: about 12×", None)


# --------------------------------------------------------------------------------------------
# 5. pipeline and tracking overhead of the default run


def _log_times(info_log: Path) -> dict[str, float]:
    """Unix times of the run's milestones, from Kedro's own lines in info.log."""
    marks = {"first_node": "Running node: prepare_data", "data_done": "Completed node: prepare_data",
             "report_start": "Running node: cts_report", "pipeline_done": "Pipeline execution completed"}
    found: dict[str, float] = {}
    for line in info_log.read_text().splitlines():
        for key, text in marks.items():
            if text in line and key not in found:
                found[key] = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    last = info_log.read_text().splitlines()[-1]
    found["last_line"] = datetime.datetime.strptime(last[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return found


def kedro_overhead(table: SpeedTable, pairs: int = 3) -> None:
    """The default run in a fresh project, then again in the same project (the MLflow store and
    the data split exist), ``pairs`` times: wall-clock against node compute, and where the rest
    goes. The VM's speed drifts between runs, so every pair is listed and the medians are rows."""
    lines, ratios, walls = [], {"fresh project": [], "second run": []}, {"fresh project": [], "second run": []}
    for _ in range(pairs):
        _overhead_pair(lines, ratios, walls)
    for attempt, values in ratios.items():
        median = statistics.median(values)
        table.add(5, f"`kedro run --pipelines=cts` wall-clock / sum of node compute, default run, {attempt} "
            f"(median of {pairs}; \"Pipeline overhead\" below)", ", ".join(f"{v:.2f}" for v in values),
            f"{median:.2f}", "≤ 1.10 (issue 8)", median <= 1.10)
    fresh = statistics.median(walls["fresh project"])
    table.add(5, f"`kedro run --pipelines=cts` wall-clock, default run from a fresh project (median of {pairs})",
        ", ".join(f"{v:.1f} s" for v in walls["fresh project"]), f"{fresh:.1f} s", "≤ 60 s (issue 8)", fresh <= 60)
    if table.to_docs:
        from docs_blocks import replace_block

        overhead = "\n".join([
            f"`python benchmarks/speed.py --rows 5 --write-docs`, {datetime.date.today()}, "
            f"{describe_hardware(torch.device('cpu'))}.",
            "",
            f"Median wall / compute over {pairs} pairs: fresh project "
            f"**{statistics.median(ratios['fresh project']):.2f}**, second run "
            f"**{statistics.median(ratios['second run']):.2f}**.",
            "",
            "| run | wall s | node compute s | wall / compute | start-up to the first node s | data node s "
            "| report node s | after the last log line s | imports any run pays s (torch + torch._dynamo + "
            "scikit-learn) | floor: (compute + those imports) / compute |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *lines,
        ])
        replace_block("docs/performance.md", "overhead", overhead)


# What any program doing this work imports, whatever runs it: torch; torch._dynamo, which torch.optim
# imports at the first optimizer's construction (its add_param_group is wrapped by
# torch._disable_dynamo); scikit-learn's digits loader and split.
_FLOOR_SCRIPT = """
import time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import torch._dynamo
t2 = time.perf_counter()
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def import_floor(tries: int = 3) -> tuple[float, float, float]:
    """Seconds to import torch, torch._dynamo and scikit-learn's loader, in a fresh interpreter: the
    fastest of ``tries`` (the first after a long benchmark can read the files from a cold disk
    cache, 14.7 s for scikit-learn once, which says nothing about what a run must pay)."""
    times = []
    for _ in range(tries):
        out = subprocess.run([sys.executable, "-c", _FLOOR_SCRIPT], check=True, capture_output=True, text=True)
        times.append(tuple(float(v) for v in out.stdout.split()))
    return min(times, key=sum)


def _overhead_pair(lines: list[str], ratios: dict[str, list[float]], walls: dict[str, list[float]]) -> None:
    floor = import_floor()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        shutil.copytree(ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
        (project / "conf" / "local").mkdir()
        (project / "src").mkdir()
        shutil.copy(ROOT / "pyproject.toml", project)
        env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true",
               "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
        for attempt in ("fresh project", "second run"):
            (project / "info.log").unlink(missing_ok=True)
            started = time.time()
            subprocess.run([sys.executable, "-m", "kedro", "run", "--pipelines=cts"], cwd=project, env=env,
                           check=True, capture_output=True)
            ended = time.time()
            wall = ended - started
            compute = 0.0
            newest: dict[str, Path] = {}
            for path in project.glob("data/08_reporting/default/*/seed0/**/metrics.json/*/metrics.json"):
                branch = str(path.parents[1])
                if branch not in newest or path.parent.name > newest[branch].parent.name:
                    newest[branch] = path
            for path in newest.values():
                metrics = json.loads(path.read_text())
                s = metrics["seconds"]
                # Stage times exclude test evaluations, which are part of the nodes' compute here.
                if metrics["method"] == "dense":
                    compute += s["train"] + s.get("test_during_training", 0.0)
                else:
                    compute += s["find_mask"] + s["retrain"] + s.get("test_during_retrain", 0.0) + s["evaluate"]
            t = _log_times(project / "info.log")
            ratios[attempt].append(wall / compute)
            walls[attempt].append(wall)
            lines.append(f"| {attempt} | {wall:.1f} | {compute:.1f} | **{wall / compute:.2f}** | "
                         f"{t['first_node'] - started:.1f} | {t['data_done'] - t['first_node']:.1f} | "
                         f"{t['pipeline_done'] - t['report_start']:.1f} | {ended - t['last_line']:.1f} | "
                         f"{' + '.join(f'{v:.1f}' for v in floor)} | {(compute + sum(floor)) / compute:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="rows 1-3 and 6 at toy sizes: checks the script (its figures are not written)")
    parser.add_argument("--rows", default="1,2,3,4,5,6", help="which rows to measure, e.g. 4,5")
    parser.add_argument("--mnist", type=Path, default=ROOT.parent / "shared" / "data",
                        help="folder holding MNIST/raw (row 4)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true",
                        help="rewrite the measured rows in docs/performance.md (and row 5's overhead table)")
    args = parser.parse_args()
    if args.write_docs and args.quick:
        raise SystemExit("--quick checks the script; its figures say nothing and are not written")
    device = training_device(args.device)
    cuda = device.type == "cuda"
    quick = args.quick
    conv_batch = 32 if quick else 512 if cuda else 128
    repeats = 1 if quick else args.repeats
    print(f"hardware: {describe_hardware(device)}", flush=True)

    rows = {int(r) for r in args.rows.split(",")} - ({4, 5} if quick else set())
    table = SpeedTable(device, to_docs=args.write_docs)
    if 1 in rows:
        loop_ratio(table, "lenet_300_100", synthetic("mnist", 512 if quick else 12_800, device), 128, device,
                   channels_last=False, repeats=repeats)
        loop_ratio(table, "resnet20", synthetic("cifar10", 128 if quick else 25_600 if cuda else 2_560, device),
                   conv_batch, device, channels_last=True, repeats=repeats)
    if 2 in rows:
        for name, shape, batch, channels_last, steps in [
            ("resnet20", (3, 32, 32), conv_batch, True, 5),
            ("resnet20", (3, 32, 32), conv_batch, False, 5),
            ("lenet_300_100", (1, 28, 28), 128, False, 100),
            # VGG-16's 15 M weights at batch 512: minutes per row on a CPU
            *([("vgg16", (3, 32, 32), conv_batch, True, 5)] if cuda else []),
        ]:
            step_ratio(table, name, shape, batch, device, channels_last=channels_last, repeats=repeats,
                       steps=1 if quick else steps)
    if 3 in rows:
        data_path_ratio(table, device, 512 if quick else 5_000, repeats=repeats if quick else 3)
    if 4 in rows:
        if (args.mnist / "MNIST" / "raw").is_dir():
            cts_vs_ltr(table, args.mnist, device)
        else:
            print(f"skipping row 4: no MNIST under {args.mnist}", flush=True)
    if 5 in rows:
        kedro_overhead(table)
    if 6 in rows:
        preset_steps(table, device, images=128 if quick else 10_240 if cuda else 2_048,
                     batch=64 if quick else 512, repeats=repeats, width=8 if quick else None)

    print(f"\nhardware: {describe_hardware(device)}; torch threads {torch.get_num_threads()}\n")
    print("| # | measurement | times | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    for number, what, measured, ratio, target, met in table.rows:
        print(f"| {number} | {what} | {measured} | {ratio} | {target} | {met} |")
    if args.write_docs:
        table.write()

if __name__ == "__main__":
    main()
