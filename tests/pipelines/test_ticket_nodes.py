"""The nodes every method shares once it has scores: the binary mask, with its warnings."""

from __future__ import annotations

import logging

import pytest
import torch

from cts_pipeline.config.sweep import Branch
from cts_pipeline.pipelines.tickets.nodes import topk_mask


def scores() -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.arange(50, dtype=torch.float32).view(5, 10) / 100,  # all below fc's
            "fc.weight": 1.0 + torch.arange(50, dtype=torch.float32)}


def test_a_mask_that_keeps_only_a_handful_of_a_layer_is_warned_about(caplog):
    branch = Branch("cts_kl", 0, 1 - 50 / 97, family="cts", settings={"objective": "kl"})
    with caplog.at_level(logging.WARNING, logger="cts_pipeline"):
        payload = topk_mask(scores(), Branch("cts_kl", 0, 0.9, family="cts", settings={"objective": "kl"}))
    assert payload["kept"] == {"conv.weight": 0, "fc.weight": 10}  # collapse: reported by evaluate
    assert not [r for r in caplog.records if "close to collapse" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cts_pipeline"):
        payload = topk_mask({**scores(), "fc.weight": scores()["fc.weight"][:47]}, branch)
    assert payload["kept"] == {"conv.weight": 3, "fc.weight": 47}
    [warning] = [r.getMessage() for r in caplog.records]
    assert "cts_kl.seed0.sp48_45" in warning and "3 of 50 weights in conv.weight" in warning
    assert "cts.min_kept_per_layer" in warning


@pytest.mark.parametrize(("family", "expected_conv"), [("cts", 8), ("pai", 0)])
def test_the_layer_floor_is_a_cts_ablation_only(family, expected_conv):
    settings = {"objective": "kl", "min_kept_per_layer": 8} if family == "cts" else {"method": "snip"}
    payload = topk_mask(scores(), Branch("x", 0, 0.8, family=family, settings=settings))
    assert payload["kept_weights"] == 20
    assert payload["kept"]["conv.weight"] == expected_conv
    if family == "cts":  # the floor takes conv's 8 best, fc the 12 best of the rest
        mask = payload["masks"]["conv.weight"].reshape(-1)
        assert mask.nonzero().flatten().tolist() == list(range(42, 50))
