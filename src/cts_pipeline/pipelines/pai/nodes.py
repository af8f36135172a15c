"""Pruning at initialisation: one score per weight from a registered method, then the global top-k."""

from __future__ import annotations

import time

from ...config.sections import ModelConfig, RuntimeConfig
from ...config.sweep import Branch
from ...core.device.runtime import describe_hardware
from ...core.prune.saliency import ScoringInputs, score
from ..common import build_network, device_for, split_from_payload


def score_weights(
    theta_start: dict, train_data: dict, model: ModelConfig, runtime: RuntimeConfig, branch: Branch
) -> tuple[dict, dict]:
    """Scores of ``branch.settings["method"]`` (SNIP, GraSP, SynFlow, magnitude, random) on the
    start weights (θ_0 by default, θ_k with ``pai.at: rewind``); higher means keep."""
    started_at = time.time()
    device = device_for(runtime)
    train_split = split_from_payload(train_data, device, runtime.data_workers)
    net = build_network(model, train_split, device, state=theta_start)
    started = time.perf_counter()
    scores = score(branch.settings["method"], ScoringInputs(net, train_split, branch.density, branch.seed))
    seconds = time.perf_counter() - started
    scores = {name: s.detach().cpu() for name, s in scores.items()}
    return scores, {**branch.as_dict(), "seconds": seconds, "hardware": describe_hardware(device),
                    "started_at": started_at}
