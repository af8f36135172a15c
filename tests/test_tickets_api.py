"""Tickets anyone can use: the safetensors export round-trips, and the one-call API finds masks."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from cts_pipeline import find_ticket, load_ticket
from cts_pipeline.core.data.splits import load_splits
from cts_pipeline.core.data.transforms import normalize
from cts_pipeline.core.nets.masks import payload_to_mask
from cts_pipeline.core.nets.registry import build_model
from cts_pipeline.core.prune.tickets import prune_with_mask
from cts_pipeline.core.train.loop import evaluate

from .conftest import latest


def test_an_exported_ticket_reloads_to_its_own_accuracy(finished_project):
    project = finished_project  # after `kedro run --pipelines=cts --env=smoke`
    path = latest(project, "data/07_model_output/smoke/cts_kl-*/seed0/sp90_00/ticket.safetensors")
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["method"] == "cts_kl" and manifest["target_sparsity"] == 0.9
    assert manifest["kept_weights"] == sum(manifest["layer_kept"].values()) == 369

    model, mask, manifest_loaded = load_ticket(path)
    assert manifest_loaded == manifest  # the ticket says what it is: method, sparsity, accuracy, recipe
    mask_file = payload_to_mask(torch.load(latest(project, "data/07_model_output/smoke/cts_kl-*/seed0/sp90_00/mask.pt"),
                                           weights_only=True))
    assert all(torch.equal(mask[k], mask_file[k]) for k in mask_file)
    _, test = load_splits("digits", "data/01_raw", False)
    test = test.subset(200)  # the smoke preset's test split
    table = pd.read_csv(latest(project, "data/08_reporting/smoke/report-*/cts_results.csv"))
    expected = table.loc[table["target_sparsity_pct"] == 90.0, "test_accuracy"].item()
    assert evaluate(model, test, 1000, channels_last=True)["accuracy"] == pytest.approx(expected, abs=1e-9)
    for name, keep in mask.items():  # pruned through torch.nn.utils.prune: zero stays zero
        owner, _, attr = name.rpartition(".")
        assert not getattr(model.get_submodule(owner), attr)[~keep].any()

    fresh = load_ticket(path, weights=False).model
    assert hasattr(fresh.get_submodule(next(iter(mask)).rpartition(".")[0]), "weight_mask")


def test_a_ticket_refuses_a_model_of_other_shapes():
    small = build_model("convnet", image_shape=(1, 8, 8), num_classes=10, width=8)
    other = build_model("convnet", image_shape=(1, 8, 8), num_classes=10, width=16)
    mask = {name: torch.ones_like(p, dtype=torch.bool) for name, p in small.named_parameters() if name.endswith("weight")
            and p.dim() > 1}
    with pytest.raises(ValueError, match=r"mask for \S+ has shape"):
        prune_with_mask(other, mask)


def test_find_ticket_on_a_plain_module_and_tensors():
    train, _ = load_splits("digits", "data/01_raw", False)
    train = train.subset(256)
    images = normalize(train.images, train.info)
    model = build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10,
                        generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ticket = find_ticket(model, images, train.labels, sparsity=0.9, epochs=2, batch_size=64)
    total = sum(m.numel() for m in ticket.mask.values())
    assert ticket.kept_weights == round(0.1 * total) == sum(r["kept"] for r in ticket.layers.values())
    assert len(ticket.history) == 2 and "expected_over_budget" in ticket.history[-1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the search leaves weights alone"
    ticket.apply(model)
    assert all(not model.get_submodule(k.rpartition(".")[0]).weight[~m].any() for k, m in ticket.mask.items())


def test_the_library_face_imports_no_pipeline_stack():
    """``from cts_pipeline import find_ticket, load_ticket`` in a notebook pulls in neither Kedro,
    MLflow, Dask, matplotlib nor rich: a fresh interpreter that refuses those imports loads the API."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('kedro', 'kedro_datasets', 'mlflow', 'dask', 'distributed',\n"
        "                                  'matplotlib', 'rich'):\n"
        "            raise ImportError('refused: ' + name)\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "from cts_pipeline import find_ticket, load_ticket, Ticket\n"
        "print('imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("shape, model", [
    ((64,), lambda: torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))),
    ((8, 8), lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))),  # a sequence of 8 steps
])
def test_find_ticket_takes_inputs_of_any_shape_the_model_takes(shape, model):
    """An MLP on ``[N, features]`` and a model on ``[N, steps, features]``: inputs are handed to the
    model as they are (no image normalisation), one search or a batched one, exact kept counts."""
    train, _ = load_splits("digits")
    inputs = normalize(train.images[:256], train.info).reshape(256, *shape)
    labels = train.labels[:256]
    torch.manual_seed(0)
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    one = find_ticket(net, inputs, labels, sparsity=0.9, epochs=2, batch_size=64)
    both = find_ticket(net, inputs, labels, sparsity=[0.9, 0.95], epochs=2, batch_size=64)
    total = sum(p.numel() for n, p in net.named_parameters() if n.endswith("weight"))
    assert one.kept_weights == round(0.1 * total) == both[0].kept_weights
    assert both[1].kept_weights == round(0.05 * total)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match=r"inputs must be \[N, \.\.\.\] \(one row per sample\), got \[256\]"):
        find_ticket(net, inputs[:, 0].reshape(-1) if inputs.dim() == 2 else inputs[:, 0, 0], labels, sparsity=0.9)


class CountingDigits(torch.utils.data.Dataset):
    """Digits as an MLP takes them, counting every sample read (a stand-in for data too large to hold)."""

    def __init__(self, n: int):
        train, _ = load_splits("digits")
        self.inputs = normalize(train.images[:n], train.info).reshape(n, 64)
        self.labels = train.labels[:n]
        self.reads = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        self.reads += 1
        return self.inputs[i], self.labels[i]


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def test_a_dataloader_is_streamed_every_epoch_never_gathered():
    """Issue 23: a DataLoader is read batch by batch in each epoch, so data larger than memory can be
    searched: every sample is read once per epoch (and the first batch once for the checks), not
    once into one tensor. Several sparsities batch into one search."""
    data = CountingDigits(256)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    net = mlp()
    tickets = find_ticket(net, loader, sparsity=[0.9, 0.95], epochs=3)
    assert data.reads == 64 + 3 * 256
    total = sum(p.numel() for n, p in net.named_parameters() if n.endswith("weight"))
    assert [t.kept_weights for t in tickets] == [round(0.1 * total), round(0.05 * total)]
    assert len(tickets[0].history) == 3


def test_prunable_chooses_the_layers_and_the_others_stay_dense():
    data = CountingDigits(128)
    net = mlp()
    by_name = find_ticket(net, data.inputs, data.labels, sparsity=0.9, epochs=1, batch_size=64, prunable=["0"])
    assert list(by_name.layers) == ["0.weight"] and by_name.kept_weights == round(0.1 * 64 * 32)
    assert by_name.dense_layers == ("2.weight",) and by_name.mask["2.weight"].all()
    by_rule = find_ticket(net, data.inputs, data.labels, sparsity=0.9, epochs=1, batch_size=64,
                          prunable=lambda name, module: module.out_features == 10)
    assert list(by_rule.layers) == ["2.weight"] and by_rule.kept_weights == 32
    assert by_rule.dense_layers == ("0.weight",) and int(by_rule.mask["2.weight"].sum()) == 32
    assert not hasattr(net, "keep_dense"), "the model is as it was"
    with pytest.raises(ValueError, match="prunable names 5, which are not Conv or Linear layers"):
        find_ticket(net, data.inputs, data.labels, sparsity=0.9, prunable=["5"])
    with pytest.raises(ValueError, match="prunable selects no layer"):
        find_ticket(net, data.inputs, data.labels, sparsity=0.9, prunable=lambda name, module: False)


def test_a_ticket_of_some_layers_applies_and_retrains_with_the_others_whole():
    """find_ticket(..., prunable=[...]) gives a ticket that ``retrain`` and ``apply`` take: the
    layers outside ``prunable`` are simply unpruned (they used to be missing from the mask)."""
    from cts_pipeline.core.train.recipe import TrainRecipe

    data = CountingDigits(128)
    net = mlp()
    ticket = find_ticket(net, data.inputs, data.labels, sparsity=0.9, epochs=1, batch_size=64, prunable=["0"])
    before = net[2].weight.detach().clone()
    result = ticket.retrain(net, data.inputs, data.labels, recipe=TrainRecipe(epochs=1, batch_size=64, lr=0.05))
    assert len(result.history) == 1
    assert int((net[0].weight != 0).sum()) <= ticket.kept_weights, "the searched layer stays pruned"
    assert not torch.equal(net[2].weight, before) and bool((net[2].weight != 0).all()), "the other trains whole"
    pruned = ticket.apply(net)
    assert int(pruned[0].weight_mask.sum()) == ticket.kept_weights and bool(pruned[2].weight_mask.all())


def test_a_model_pruned_with_torch_prune_is_refused_in_one_line():
    """The README's own sequence (``ticket.apply(my_model)``, then ``find_ticket(my_model, ...)``)
    used to fail deep inside with "element 0 of tensors does not require grad"."""
    data = CountingDigits(128)
    net = mlp()
    ticket = find_ticket(net, data.inputs, data.labels, sparsity=0.9, epochs=1, batch_size=64)
    ticket.apply(net)
    with pytest.raises(ValueError) as refused:
        find_ticket(net, data.inputs, data.labels, sparsity=0.9, epochs=1, batch_size=64, prunable=["0"])
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("find_ticket: the model is already pruned with torch.nn.utils.prune (layers 0, 2)")
    assert "torch.nn.utils.prune.remove(module, 'weight')" in message
    for module in (net[0], net[2]):  # what the message says to do, and the search then runs
        torch.nn.utils.prune.remove(module, "weight")
    again = find_ticket(net, data.inputs, data.labels, sparsity=0.95, epochs=1, batch_size=64, prunable=["0"])
    assert again.kept_weights == round(0.05 * 64 * 32)


def test_a_ticket_retrains_with_the_projects_trainer_and_reports_test_accuracy():
    from cts_pipeline.core.train.recipe import TrainRecipe

    train, test = load_splits("digits")
    inputs, labels = normalize(train.images, train.info).reshape(-1, 64), train.labels
    net = mlp()
    ticket = find_ticket(net, inputs, labels, sparsity=0.9, epochs=2)
    recipe = TrainRecipe(epochs=3, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4)
    result = ticket.retrain(net, inputs, labels, test=(normalize(test.images, test.info).reshape(-1, 64), test.labels),
                            recipe=recipe)
    assert len(result.history) == 3 and result.final["test_accuracy"] > 50.0  # far above chance (10 %)
    weights = dict(net.named_parameters())
    assert all(not weights[n][~keep].any() for n, keep in ticket.mask.items()), "pruned weights stay zero"
    with pytest.raises(ValueError, match="not one pruned by ticket.apply"):
        ticket.retrain(ticket.apply(mlp()), inputs, labels)
