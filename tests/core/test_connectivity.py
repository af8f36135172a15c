"""Effective sparsity on hand-built masks: kept weights off every input-output path are inactive."""

from __future__ import annotations

import torch
from torch import nn

from cts_pipeline.core.nets.masks import prunable_parameters
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.prune.connectivity import effective_mask, effective_report


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2))


def full(model) -> dict:
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model).items()}


def test_a_dense_mask_is_fully_effective_whatever_the_weights():
    model = mlp()
    for p in model.parameters():
        p.data.normal_()  # negative weights and biases play no part: only the structure counts
    report = effective_report(model, full(model), (3,))
    assert report["effective_kept_weights"] == 3 * 4 + 4 * 2 + 2 * 2 and report["inactive_kept_weights"] == 0
    assert not report["disconnected"]


def test_units_without_inputs_or_without_outputs_make_their_weights_inactive():
    model = mlp()
    mask = full(model)
    mask["0.weight"][1, :] = False  # hidden unit 1 of layer 1 receives nothing...
    mask["2.weight"][:, 3] = False  # ...and unit 3 sends nothing on
    effective = effective_mask(model, mask, (3,))
    assert not effective["2.weight"][:, 1].any(), "weights reading a unit nothing reaches are inactive"
    assert not effective["0.weight"][3, :].any(), "weights into a unit nobody reads are inactive"
    assert effective["0.weight"][[0, 2], :].all() and effective["2.weight"][:, [0, 2]].all()
    assert effective["4.weight"].all()
    report = effective_report(model, mask, (3,))
    assert report["inactive_kept_weights"] == 2 + 3 and not report["disconnected"]


def test_a_mask_can_disconnect_the_network_with_no_layer_empty():
    model = mlp()
    mask = {n: torch.zeros_like(m) for n, m in full(model).items()}
    mask["0.weight"][0, 0] = True  # input 0 -> unit 0
    mask["2.weight"][1, 2] = True  # unit 2 (unreached) -> unit 1
    mask["4.weight"][0, 0] = True  # unit 0 of layer 2 (unreached) -> output 0
    report = effective_report(model, mask, (3,))
    assert all(m.any() for m in mask.values()), "no layer collapsed"
    assert report["disconnected"] and report["effective_kept_weights"] == 0
    assert report["inactive_kept_weights"] == 3


def test_convolution_filters_fed_by_pruned_channels_are_inactive_and_max_pool_windows_count_whole():
    model = build_model("convnet", image_shape=(1, 8, 8), num_classes=10, width=2)  # channels 2, 4, 4
    mask = full(model)
    mask["block1.0.weight"][0] = False  # block1 channel 0 gets no input
    effective = effective_mask(model, mask, (1, 8, 8))
    assert not effective["block2.0.weight"][:, 0].any(), "block2 weights reading channel 0 are inactive"
    assert effective["block2.0.weight"][:, 1].all()
    # Only one tap per 3x3 kernel kept: connected through any window position (max-pool as average).
    mask = full(model)
    mask["block3.0.weight"][:] = False
    mask["block3.0.weight"][:, :, 0, 0] = True
    report = effective_report(model, mask, (1, 8, 8))
    assert report["inactive_kept_weights"] == 0
