"""Sanity checks (Frankle et al. 2021): perturb a method's mask or weights and retrain.

A method *passes* a check when the perturbation costs accuracy beyond the seed-to-seed spread:
its mask carries information that a layerwise shuffle, an inversion or a fresh initialisation
destroys.
"""

from __future__ import annotations

import pandas as pd

from ...config.sections import ModelConfig
from ...config.sweep import Branch
from ...core.device.runtime import generator
from ...core.nets.masks import mask_to_payload, payload_to_mask
from ...core.prune.sanity import invert, layerwise_shuffle, passes, reinitialised
from ...core.train.loop import state_on_cpu
from ..common import payload_info


def shuffle_mask(mask: dict, branch: Branch) -> dict:
    """The checked mask with each layer's kept count, at random positions."""
    shuffled = layerwise_shuffle(payload_to_mask(mask), generator("cpu", branch.seed, "sanity-shuffle"))
    return mask_to_payload(shuffled, mask["target_density"])


def invert_mask(scores: dict, branch: Branch) -> dict:
    """Keep the ``round(κ·d)`` lowest-scored weights instead of the highest."""
    return mask_to_payload(invert(scores, branch.density), branch.density)


def reinitialise(train_data: dict, model: ModelConfig, branch: Branch) -> dict:
    """A fresh random initialisation (another stream than the dense run's θ_0), same architecture."""
    info = payload_info(train_data)
    fresh = model.replace(weights=None)  # a fresh initialisation, whatever the run started from
    net = reinitialised(lambda init: fresh.build(info.image_shape, info.num_classes, generator=init), branch.seed)
    return state_on_cpu(net)


def sanity_table(*metrics: dict) -> pd.DataFrame:
    """Per (method, sparsity, check): reference and perturbed accuracy (means over seeds), the
    change, the reference's seed-to-seed spread, and whether the method passes."""
    results: dict[tuple, list[float]] = {}
    checks: dict[tuple, list[float]] = {}
    for m in metrics:
        sparsity = round(m["target_sparsity"], 6)
        if m["family"] == "sanity":
            checks.setdefault((m["checked_method"], sparsity, m["method"]), []).append(m["test_accuracy"])
        else:
            results.setdefault((m["method"], sparsity), []).append(m["test_accuracy"])
    rows = []
    for (method, sparsity, check_name), accuracies in sorted(checks.items()):
        reference = results.get((method, sparsity), [])
        if not reference:
            continue
        verdict = passes(accuracies, reference)
        rows.append({
            "method": method,
            "check": check_name.removeprefix(method + "_"),
            "target_sparsity_pct": 100 * sparsity,
            "seeds": len(accuracies),
            "reference_accuracy": sum(reference) / len(reference),
            "check_accuracy": sum(accuracies) / len(accuracies),
            "accuracy_change": verdict["accuracy_change"],
            "seed_spread": verdict["spread"],
            "passes": verdict["passes"],
        })
    return pd.DataFrame(rows, columns=["method", "check", "target_sparsity_pct", "seeds", "reference_accuracy",
                                       "check_accuracy", "accuracy_change", "seed_spread", "passes"])
