"""A sweep on a dataset streamed from JPEG folders (Tiny-ImageNet's layout, written by the test):
the pipeline stores where the images are, not the images, and trains, searches and retrains from
the folders through the loaders."""

from __future__ import annotations

import pandas as pd
import torch

from .conftest import latest, run_pipeline
from .core.test_image_folders import tiny_imagenet


def test_the_sweep_runs_on_a_streamed_dataset(project, tmp_path):
    tiny_imagenet(tmp_path / "images", per_class=8, noise=60)
    params = {"data": {"name": "tiny_imagenet", "root": str(tmp_path / "images")},
              "training": {"batch_size": 8, "augment": True},
              "runtime": {"data_workers": 1}}
    run_pipeline(project, params=params)
    (prepared,) = project.glob("data/05_model_input/smoke/data-*/train.pt")
    train = torch.load(prepared, weights_only=True)
    assert "images" not in train and train["streamed"]["split"] == "train", \
        "the prepared split holds the files' place and digest, not pixels"
    assert train["labels"].tolist() == [0] * 8 + [1] * 8
    table = pd.read_csv(latest(project, "data/08_reporting/smoke/report-*/cts_results.csv"))
    assert list(table["target_sparsity_pct"]) == [0.0, 50.0, 90.0]
    assert table["test_accuracy"].notna().all()
