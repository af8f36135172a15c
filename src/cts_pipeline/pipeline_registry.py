"""Project pipelines, built from the sweep the active configuration plans (``config.sweep.plan``).

- ``cts``: the main job, CTS with the ``cts`` settings at every grid sparsity and seed;
- ``ltr``, ``pai``: the baselines (lottery ticket rewinding; SNIP, GraSP, SynFlow, magnitude, random);
- ``compare``: CTS, its ablations (``methods.cts_variants``) and every baseline, one report;
- ``sanity``: layerwise shuffle, inversion and reinitialisation of the ``sanity.methods``;
- ``__default__``: ``compare`` and ``sanity``.
Every pipeline shares the data preparation and the dense runs; tickets share retraining and
evaluation, so a branch that several pipelines contain is one and the same set of nodes.
"""

from __future__ import annotations

import warnings

import torch
from kedro.pipeline import Pipeline

from .config import active as active_config
from .config.sweep import Branch, plan
from .core.device.runtime import resolve_device
from .core.train.batched import stacks_seeds
from .pipelines.cts.pipeline import create_pipeline as cts_pipeline
from .pipelines.data_processing.pipeline import create_pipeline as data_pipeline
from .pipelines.dense.pipeline import create_pipeline as dense_pipeline
from .pipelines.ltr.pipeline import create_pipeline as ltr_pipeline
from .pipelines.pai.pipeline import create_pipeline as pai_pipeline
from .pipelines.reporting.pipeline import create_pipeline as report_pipeline
from .pipelines.sanity.pipeline import create_pipeline as sanity_pipeline
from .pipelines.sanity.pipeline import create_report as sanity_report


def register_pipelines() -> dict[str, Pipeline]:
    return build_pipelines(active_config.parameters())


def _metrics(branches: list[Branch]) -> list[str]:
    return [f"{b.namespace}.metrics" for b in branches]


def _device_or_cpu(choice) -> torch.device:
    """The run's device, or the CPU for a choice the run will refuse when it starts (in one line)."""
    try:
        return resolve_device(choice)
    except (ValueError, TypeError, RuntimeError):
        return torch.device("cpu")


def build_pipelines(params: dict) -> dict[str, Pipeline]:
    """Every pipeline of the sweep that the raw parameters ``params`` plan."""
    # Branches read datasets of other namespaces on purpose (each branch reads its seed's
    # dense.seed<N>.theta_rewind; reports read every branch's metrics). Kedro warns about dotted
    # names crossing top-level namespaces; here that is the design, not a slip.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.' characters")
        return _build(plan(params), params)


def _build(p, params: dict) -> dict[str, Pipeline]:
    runtime = params.get("runtime") or {}
    batch = runtime.get("batch_sparsities", True) is not False
    stack_seeds = stacks_seeds(runtime.get("stack_seeds", "auto"), _device_or_cpu(runtime.get("device", "auto")))
    base = data_pipeline(params.get("data")) + dense_pipeline(p.dense, stack_seeds)
    cts = cts_pipeline(p.cts, batch, stack_seeds)
    variants = cts_pipeline(p.cts_variants, batch, stack_seeds)
    ltr = ltr_pipeline(p.ltr_runs, p.ltr, batch, stack_seeds)
    pai = pai_pipeline(p.pai, batch, stack_seeds)

    def with_report(name: str, branches: list[Branch], *parts: Pipeline) -> Pipeline:
        return base + sum(parts, Pipeline([])) + report_pipeline(name, _metrics(p.dense) + _metrics(branches))

    compared = p.cts + p.cts_variants + p.ltr + p.pai
    pipelines = {
        "cts": with_report("cts", p.cts, cts),
        "ltr": with_report("ltr", p.ltr, ltr),
        "pai": with_report("pai", p.pai, pai),
        "compare": with_report("compare", compared, cts, variants, ltr, pai),
    }
    checked = {b.settings["of"] for b in p.sanity}
    family_of = {b.method: pipe for branches, pipe in ((p.cts, cts), (p.cts_variants, variants), (p.ltr, ltr),
                                                        (p.pai, pai)) for b in branches}
    references = [b for b in compared if b.method in checked]
    pipelines["sanity"] = (base + sum((family_of[m] for m in sorted(checked)), Pipeline([]))
                           + sanity_pipeline(p.sanity, batch, stack_seeds) + sanity_report(_metrics(references) + _metrics(p.sanity)))
    pipelines["__default__"] = pipelines["compare"] + pipelines["sanity"]
    return pipelines
