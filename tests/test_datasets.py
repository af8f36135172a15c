"""Catalog datasets: torch files load with weights_only, corruption is named, saves are atomic."""

from __future__ import annotations

import pytest
import torch
from kedro.io.core import DatasetError, Version

from cts_pipeline.datasets import CSVDataset, JSONDataset, MatplotlibDataset, TorchDataset


def figure():
    from matplotlib.figure import Figure

    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def test_round_trip_versioned(tmp_path):
    path = str(tmp_path / "mask.pt")
    TorchDataset(filepath=path, version=Version(None, "2026-01-01T00.00.00.000Z")).save(
        {"masks": {"fc.weight": torch.tensor([True, False])}, "kept": 1})
    TorchDataset(filepath=path, version=Version(None, "2026-01-02T00.00.00.000Z")).save({"kept": 2})
    latest = TorchDataset(filepath=path, version=Version(None, None))
    assert latest.exists() and latest.load() == {"kept": 2}
    first = TorchDataset(filepath=path, version=Version("2026-01-01T00.00.00.000Z", None)).load()
    assert torch.equal(first["masks"]["fc.weight"], torch.tensor([True, False]))


class Payload:  # an arbitrary class: weights_only must refuse to unpickle it
    pass


def test_refuses_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(DatasetError, match="corrupted or not a torch file"):
        TorchDataset(filepath=str(path)).load()


def test_corrupted_file_is_named(tmp_path):
    path = tmp_path / "theta.pt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])  # a crash mid-write would look like this
    with pytest.raises(DatasetError, match=str(path)):
        TorchDataset(filepath=str(path)).load()


@pytest.mark.parametrize("make", [
    lambda p: (TorchDataset(filepath=p), {"w": torch.ones(3)}),
    lambda p: (JSONDataset(filepath=p), {"accuracy": 97.5}),
    lambda p: (CSVDataset(filepath=p), __import__("pandas").DataFrame({"a": [1.5]})),
    lambda p: (MatplotlibDataset(filepath=p), figure()),
])
def test_failed_save_leaves_nothing(tmp_path, monkeypatch, make):
    dataset, data = make(str(tmp_path / "artifact"))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(dataset._fs, "mv", crash)
    with pytest.raises((KeyboardInterrupt, DatasetError)):
        dataset.save(data)
    assert list(tmp_path.iterdir()) == [], "a failed save must leave neither the file nor a partial one"


def test_json_round_trip(tmp_path):
    ds = JSONDataset(filepath=str(tmp_path / "m.json"))
    ds.save({"test_accuracy": 96.6, "layer_density": {"fc1.weight": 0.004}})
    assert ds.load()["layer_density"]["fc1.weight"] == 0.004


def test_report_datasets_round_trip(tmp_path):
    import pandas as pd

    table = CSVDataset(filepath=str(tmp_path / "t.csv"), save_args={"index": False})
    table.save(pd.DataFrame({"method": ["cts_kl"], "test_accuracy": [97.25]}))
    assert table.load().to_dict("records") == [{"method": "cts_kl", "test_accuracy": 97.25}]
    image = tmp_path / "p.png"
    MatplotlibDataset(filepath=str(image)).save(figure())
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.partial-*"))
