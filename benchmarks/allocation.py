"""Where does each method spend its weight budget? Per-layer kept counts, accuracy and collapse of
CTS-KL and its variants against SynFlow and SNIP at extreme sparsity on small convnets (issue 13).

    python benchmarks/allocation.py                   # both widths, 3 seeds (about 25 min, 2 CPU cores)
    python benchmarks/allocation.py --widths 16 --seeds 0
    python benchmarks/allocation.py --mnist ../shared/data --json docs/allocation.json --write-docs  # +20 min
    python benchmarks/allocation.py --from-json docs/allocation.json   # the tables again, from the raw numbers
    python benchmarks/allocation.py --authors-bn --json docs/allocation_authors_bn.json --write-docs  # ~8 min

``--authors-bn`` runs CTS-KL (×100) and SynFlow again with the authors' BatchNorm handling (TLAB
68c9740): no running statistics (the batch's statistics at evaluation, in the search and in
SynFlow's stand-in neutral ones), γ ~ U(0, 1), and their per-GPU evaluation batch of 128.

Runs `core/` directly (no Kedro): digits, `convnet` at each width, the default recipe of
`conf/base/parameters.yml` (30 epochs, SGD 0.1, x0.1 at 15 and 25, batch 64, weight decay 5e-4,
rewind epoch 1). Every ticket is retrained from θ_1 (PaI from θ_0) and its last-epoch test
accuracy reported. The CTS variants also print, per layer, the median |gradient| handed to Adam
(at the last step of every search epoch, then the median over epochs) next to Adam's eps, the
share of search steps spent under budget (λ* = 0, so λ only decays), and the classifier's share
of the expected kept count Σσ(s) at the start, at the end and in under- and over-budget epochs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from dataclasses import replace

import torch
from docs_blocks import replace_block

from cts_pipeline.core.cts import SearchConfig, concrete_search
from cts_pipeline.core.data.splits import load_splits
from cts_pipeline.core.device.runtime import describe_hardware, generator
from cts_pipeline.core.nets.masks import collapsed_layers, global_topk_mask, layer_report
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.prune.saliency import ScoringInputs, score
from cts_pipeline.core.train.loop import train
from cts_pipeline.core.train.recipe import TrainRecipe

SPARSITIES = (0.9820, 0.9926, 0.9953)
ADAM_EPS = 1e-8
FEW_WEIGHTS = 8  # a layer keeping fewer than this is flagged (see cts_pipeline.core.nets.masks.thin_layers)

# name -> the `cts` settings (None: a saliency method scored at initialisation)
METHODS: dict[str, dict | None] = {
    "cts_kl x1 (old default)": {"objective": "kl", "loss_scale": 1.0},
    "cts_kl x100 (authors)": {"objective": "kl"},
    "cts_fkl x100": {"objective": "fkl"},
    "cts_ce x100": {"objective": "ce"},
    "cts_kl short x100": {"objective": "kl", "search_length": "short"},
    "cts_kl short x1": {"objective": "kl", "search_length": "short", "loss_scale": 1.0},
    "cts_kl lr0.01 x1": {"objective": "kl", "lr": 0.01, "loss_scale": 1.0},
    "cts_kl x100 floor16": {"objective": "kl", "min_kept_per_layer": 16},
    "synflow": None,
    "snip": None,
}

# (dataset, model, model options) -> the recipe of its preset (conf/base, conf/mnist_lenet)
DIGITS = TrainRecipe(epochs=30, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4,
                     milestones=(15, 25), gamma=0.1, rewind_epoch=1, eval_every=1000)
MNIST = TrainRecipe(epochs=20, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
                    milestones=(10, 15), gamma=0.1, rewind_epoch=1, eval_every=1000)
MNIST_METHODS = ("cts_kl x1 (old default)", "cts_kl x100 (authors)", "synflow")
AUTHORS_BN = {"bn_running_stats": False, "bn_weight_init": "uniform"}
AUTHORS_BN_METHODS = ("cts_kl x100 (authors)", "synflow")


class Setup:
    """One network on one dataset with its preset's recipe."""

    def __init__(self, label: str, model: str, options: dict, recipe: TrainRecipe, splits, methods):
        self.label, self.model, self.options, self.recipe, self.splits = label, model, options, recipe, splits
        self.methods = {m: METHODS[m] for m in methods}

    def net(self, seed: int):
        info = self.splits[0].info
        return build_model(self.model, image_shape=info.image_shape, num_classes=info.num_classes,
                           generator=generator("cpu", seed, "model-init"), **self.options)

    def retrain(self, theta: dict, mask: dict, start: int, seed: int) -> float:
        net = self.net(seed)
        net.load_state_dict(theta)
        result = train(net, self.splits[0], self.splits[1], self.recipe, seed=seed, stage="retrain",
                       start_epoch=start, mask=mask, channels_last=True, progress=False)
        return result.final["test_accuracy"]


def state(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def search_diagnostics(history: list[dict], classifier: str) -> dict:
    layers = history[0]["layers"]
    grad_median = {n: statistics.median(r["layers"][n]["grad_median"] for r in history) for n in layers}

    def share(r):
        total = sum(v["expected_kept"] for v in r["layers"].values())
        return r["layers"][classifier]["expected_kept"] / total

    under = [share(r) for r in history if r["under_budget_fraction"] > 0.5]
    over = [share(r) for r in history if r["under_budget_fraction"] <= 0.5]
    return {
        "grad_median": grad_median,
        "under_budget_fraction": statistics.fmean(r["under_budget_fraction"] for r in history),
        "classifier_share": {"first_epoch": share(history[0]), "last_epoch": share(history[-1]),
                             "under_budget_epochs": statistics.fmean(under) if under else None,
                             "over_budget_epochs": statistics.fmean(over) if over else None},
    }


def run_setup(setup: Setup, seeds: list[int]) -> list[dict]:
    rows = []
    splits, width = setup.splits, setup.label
    for seed in seeds:
        net = setup.net(seed)
        theta_0 = state(net)
        started = time.perf_counter()
        dense = train(net, splits[0], splits[1], setup.recipe, seed=seed, stage="dense", snapshot_epochs={1},
                      channels_last=True, progress=False)
        theta_k = dense.snapshots[1]
        print(f"{width} seed {seed}: dense {dense.final['test_accuracy']:.2f} % "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        rows.append({"width": width, "seed": seed, "method": "dense", "sparsity": 0.0,
                     "accuracy": dense.final["test_accuracy"]})
        for method, settings in setup.methods.items():
            started = time.perf_counter()
            if settings is None:
                found = []
                for s in SPARSITIES:
                    scorer = setup.net(seed)
                    scorer.load_state_dict(theta_0)
                    scores = score(method, ScoringInputs(scorer, splits[0], 1 - s, seed))
                    found.append((s, scores, None))
                start, theta = 0, theta_0
            else:
                config = replace(SearchConfig(), **settings)
                found = []
                for s in SPARSITIES:  # one search per sparsity: the plain path
                    searcher = setup.net(seed)
                    searcher.load_state_dict(theta_k)
                    result = concrete_search(searcher, splits[0], density=1 - s, config=config, recipe=setup.recipe,
                                             seed=seed, channels_last=True, progress=False, diagnostics=True)
                    found.append((s, result.scores, result))
                start, theta = 1, theta_k
            find_seconds = time.perf_counter() - started
            for s, scores, result in found:
                mask = global_topk_mask(scores, 1 - s,
                                        min_per_layer=(settings or {}).get("min_kept_per_layer", 0))
                row = {"width": width, "seed": seed, "method": method, "sparsity": s,
                       "kept": {n: r["kept"] for n, r in layer_report(mask).items()},
                       "total": {n: r["total"] for n, r in layer_report(mask).items()},
                       "collapsed": collapsed_layers(mask),
                       "accuracy": setup.retrain(theta, mask, start, seed)}
                if result is not None:
                    row["search"] = search_diagnostics(result.history, list(mask)[-1])
                rows.append(row)
            print(f"  {method:26s} " + "  ".join(
                f"{100 * r['sparsity']:.2f}%: {r['accuracy']:5.1f}" for r in rows[-len(SPARSITIES):])
                + f"  (find {find_seconds:.0f} s)", flush=True)
    return rows


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def tables(rows: list[dict]) -> str:
    lines: list[str] = []

    def emit(text: str) -> None:
        lines.append(text)

    for width in dict.fromkeys(r["width"] for r in rows):
        at = [r for r in rows if r["width"] == width]
        methods = [m for m in METHODS if any(r["method"] == m for r in at)]
        dense = [r["accuracy"] for r in at if r["method"] == "dense"]
        layers = list(next(r for r in at if "kept" in r)["kept"])
        totals = next(r for r in at if "kept" in r)["total"]
        seeds = sorted({r["seed"] for r in at})
        emit(f"\n### {width}: dense {mean_std(dense)} % "
              f"({len(seeds)} seed{'s' * (len(seeds) > 1)})\n")
        emit("| method | sparsity | test acc % | " + " | ".join(f"{n.split('.')[0]} ({totals[n]})" for n in layers)
              + " | collapsed |")
        emit("|---|---|---|" + "---|" * len(layers) + "---|")
        for method in methods:
            for s in SPARSITIES:
                cell = [r for r in at if r["method"] == method and r["sparsity"] == s]
                kept = " | ".join("–".join(sorted({str(r["kept"][n]) for r in cell}, key=int)) if len(cell) == 1
                                  else f"{min(r['kept'][n] for r in cell)}–{max(r['kept'][n] for r in cell)}"
                                  for n in layers)
                collapsed = sum(1 for r in cell if r["collapsed"])
                emit(f"| {method} | {100 * s:.2f} % | {mean_std([r['accuracy'] for r in cell])} | {kept} | "
                      f"{f'{collapsed} of {len(cell)}' if collapsed else ''} |")
        emit(f"\nSearch diagnostics, {width} (median over seeds and sparsities; abs(g) is the absolute "
              f"gradient handed to Adam, median over the layer, eps = {ADAM_EPS:g}):\n")
        emit("| method | " + " | ".join(f"median abs(g) {n.split('.')[0]}" for n in layers)
              + " | steps under budget | classifier share of Σσ: start → end | under-budget epochs | over-budget epochs |")
        emit("|---|" + "---|" * len(layers) + "---|---|---|---|")
        for method in methods:
            if METHODS[method] is None:
                continue
            diag = [r["search"] for r in at if r["method"] == method]
            grads = " | ".join(f"{statistics.median(d['grad_median'][n] for d in diag):.1e}" for n in layers)
            share = [d["classifier_share"] for d in diag]

            def med(key, share=share):
                values = [x[key] for x in share if x[key] is not None]
                return f"{statistics.median(values):.3f}" if values else "–"

            emit(f"| {method} | {grads} | {statistics.fmean(d['under_budget_fraction'] for d in diag):.0%} | "
                  f"{med('first_epoch')} → {med('last_epoch')} | {med('under_budget_epochs')} | "
                  f"{med('over_budget_epochs')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mnist", metavar="ROOT", help="also LeNet-300-100 on MNIST from ROOT (e.g. ../shared/data): "
                        f"{', '.join(MNIST_METHODS)}, seeds 0 and 1")
    parser.add_argument("--json", help="also write every row to this file")
    parser.add_argument("--from-json", help="print the tables from a file written by --json")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the tables in docs/results.md")
    parser.add_argument("--authors-bn", action="store_true", help="CTS-KL and SynFlow with the authors' BatchNorm "
                        "handling (no running statistics, γ ~ U(0, 1), evaluation batch 128)")
    args = parser.parse_args()
    block = "allocation-authors-bn" if args.authors_bn else "allocation"
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        rows, hardware = saved["rows"], saved["hardware"]
    else:
        torch.set_num_threads(torch.get_num_threads())
        digits = load_splits("digits")
        if args.authors_bn:
            recipe = replace(DIGITS, eval_batch_size=128)
            setups = [(Setup(f"convnet width {w} on digits, the authors' BatchNorm", "convnet",
                             {"width": w, **AUTHORS_BN}, recipe, digits, AUTHORS_BN_METHODS), args.seeds)
                      for w in args.widths]
        else:
            setups = [(Setup(f"convnet width {w} on digits", "convnet", {"width": w}, DIGITS, digits, METHODS),
                       args.seeds) for w in args.widths]
        if args.mnist and not args.authors_bn:
            mnist = load_splits("mnist", args.mnist)
            setups.append((Setup("LeNet-300-100 on MNIST", "lenet_300_100", {}, MNIST, mnist, MNIST_METHODS), [0, 1]))
        started = time.perf_counter()
        rows = [r for setup, seeds in setups for r in run_setup(setup, seeds)]
        hardware = f"{describe_hardware(torch.device('cpu'))}, {time.perf_counter() - started:.0f} s in all"
        print(f"\n{hardware}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"hardware": describe_hardware(torch.device("cpu")), "rows": rows}, f, indent=1)
    text = tables(rows)
    print(text)
    if args.write_docs:
        flag = " --authors-bn" if args.authors_bn else ""
        stamp = f"Written by `python benchmarks/allocation.py{flag} --write-docs` on {datetime.date.today()}; {hardware}."
        replace_block("docs/results.md", block, f"{stamp}\n{text}")


if __name__ == "__main__":
    main()
