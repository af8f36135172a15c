"""CTS nodes: learn mask logits on the frozen start weights (θ_k, or θ_0 for search at init)."""

from __future__ import annotations

from ...config import ModelConfig, RuntimeConfig
from ...core.cts import SearchConfig, concrete_search
from ...core.runtime import describe_hardware
from ...core.training import TrainRecipe
from ...grid import Branch
from ..common import (
    build_network,
    checkpoint_for,
    data_fingerprint,
    device_for,
    split_from_payload,
    uses_channels_last,
)


def search_mask(
    theta_start: dict,
    train_data: dict,
    model: ModelConfig,
    training: TrainRecipe,
    runtime: RuntimeConfig,
    branch: Branch,
) -> tuple[dict, dict]:
    """Concrete Ticket Search at the branch's density with the branch's CTS settings.

    Returns the logits per layer (the scores the binary mask ranks) and the search log.
    """
    cts = SearchConfig(**branch.settings)
    device = device_for(runtime)
    train_split = split_from_payload(train_data, device)
    net = build_network(model, train_split, device, state=theta_start)
    result = concrete_search(
        net, train_split, density=branch.density, config=cts, recipe=training,
        seed=branch.seed, stage=f"{branch.namespace} search", progress=runtime.progress,
        checkpoint=checkpoint_for(runtime, branch.namespace, "search", model, training, branch.as_dict(),
                                  theta_start, data_fingerprint(train_data)),
        channels_last=uses_channels_last(runtime, net),
    )
    log = {
        **branch.as_dict(),
        **{f"cts_{k}": v for k, v in cts.as_dict().items()},
        "search_epochs": cts.search_epochs(training.epochs),
        "steps": result.steps,
        "budget": result.budget,
        "peak_expected_over_budget": result.peak_expected_over_budget,
        "final_expected_over_budget": result.final_expected_over_budget,
        "seconds": result.seconds,
        "history": result.history,
        "hardware": describe_hardware(device),
    }
    return result.scores, log
