"""The Python API refuses bad input before any compute, in one ValueError or TypeError naming the
argument, what was given and what is allowed; ``load_ticket`` refuses a ticket it cannot trust,
naming the file (docs/reliability.md, "The Python API")."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from cts_pipeline import find_ticket, load_ticket
from cts_pipeline.core.data.splits import load_splits
from cts_pipeline.core.data.transforms import normalize
from cts_pipeline.core.nets.registry import build_model

from .conftest import latest


@pytest.fixture(scope="module")
def digits():
    train, _ = load_splits("digits")
    train = train.subset(64)
    return normalize(train.images, train.info), train.labels


def lenet():
    return build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(0))


def refused(error: type[Exception], match: str, *args, **kwargs) -> None:
    import cts_pipeline.api as api

    calls = []
    real = api.concrete_search
    api.concrete_search = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with pytest.raises(error, match=match):
            find_ticket(*args, **kwargs)
    finally:
        api.concrete_search = real
    assert not calls, "refused before any compute"


def test_inputs_and_labels_that_cannot_belong_together(digits):
    images, labels = digits
    refused(ValueError, r"labels must be one class index per input: data holds 64 inputs, labels has shape \[60\]",
            lenet(), images, labels[:60], sparsity=0.9)
    refused(TypeError, r"labels must be integer class indices \(torch.long\), got torch.float32",
            lenet(), images, labels.float() + 0.5, sparsity=0.9)
    refused(ValueError, r"labels must lie in \[0, 10\) for a model with 10 outputs, got labels from -5 to 9",
            lenet(), images, torch.where(labels == 0, -5, labels), sparsity=0.9)
    refused(ValueError, r"labels must lie in \[0, 10\) .* to 12", lenet(), images, labels + 3, sparsity=0.9)
    refused(ValueError, r"the model does not take inputs of shape \[1, 8, 4\]: RuntimeError", lenet(),
            images[..., :4], labels, sparsity=0.9)


def test_empty_data_and_bad_sparsities(digits):
    images, labels = digits
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[:0], labels[:0]), batch_size=8)
    refused(ValueError, r"data \(a DataLoader or iterable of \(inputs, labels\) batches\) yielded no batch",
            lenet(), empty, sparsity=0.9)
    refused(ValueError, "data holds no sample", lenet(), images[:0], labels[:0], sparsity=0.9)
    refused(TypeError, r"sparsity must be a number in \(0, 1\) or a list of them .* got 'high'",
            lenet(), images, labels, sparsity="high")
    refused(ValueError, r"sparsity must be in \(0, 1\), e.g. 0.9926 for 99.26 %, got 99.26",
            lenet(), images, labels, sparsity=99.26)
    refused(ValueError, "sparsity is an empty list", lenet(), images, labels, sparsity=[])


def test_a_model_with_nothing_to_prune(digits):
    images, labels = digits
    refused(ValueError, r"model \(Flatten\) has no Conv2d or Linear layer to prune", nn.Flatten(), images, labels,
            sparsity=0.9)


def test_a_list_of_sparsities_is_one_batched_search_with_a_ticket_each(digits):
    images, labels = digits
    tickets = find_ticket(lenet(), images, labels, sparsity=[0.5, 0.9], epochs=1, batch_size=32)
    total = sum(m.numel() for m in tickets[0].mask.values())
    assert [t.kept_weights for t in tickets] == [round(0.5 * total), round(0.1 * total)]


@pytest.fixture
def ticket_file(finished_project, tmp_path):
    """A copy of a pipeline ticket with its manifest and record, to damage."""
    source = latest(finished_project, "data/07_model_output/smoke/cts_kl-*/seed0/sp90_00/ticket.safetensors")
    for suffix in ("", ".record.json"):
        shutil.copy(str(source) + suffix, str(tmp_path / "ticket.safetensors") + suffix)
    shutil.copy(source.with_suffix(".json"), tmp_path / "ticket.json")
    return tmp_path / "ticket.safetensors"


def rewrite(path, mask=None, weights=None, manifest=None, *, record: bool) -> None:
    from cts_pipeline.core.artifacts.records import RECORD_SUFFIX, record_for
    from cts_pipeline.core.prune.tickets import read_ticket, ticket_bytes

    old_mask, old_weights, old_manifest = read_ticket(path.read_bytes())
    payload = ticket_bytes(mask or old_mask, manifest or old_manifest, weights or old_weights)
    path.write_bytes(payload)
    if record:
        path.with_name(path.name + RECORD_SUFFIX).write_bytes(record_for(payload))


def test_a_ticket_whose_masks_disagree_with_its_manifest_is_refused(ticket_file):
    model, mask, _ = load_ticket(ticket_file)  # intact: loads
    edited = {name: torch.ones_like(keep) if i == 0 else keep for i, (name, keep) in enumerate(mask.items())}
    rewrite(ticket_file, mask=edited, record=True)  # a consistent record: only the manifest can tell
    first = next(iter(mask))
    with pytest.raises(ValueError, match=rf"{ticket_file}: its masks disagree with its manifest: {first} keeps "
                                         rf"{edited[first].numel()} where the manifest says {int(mask[first].sum())}"):
        load_ticket(ticket_file)


def test_a_ticket_that_no_longer_matches_its_record_is_refused(ticket_file):
    from cts_pipeline.core.prune.tickets import read_ticket

    manifest = json.loads(ticket_file.with_suffix(".json").read_text())

    _, weights, _ = read_ticket(ticket_file.read_bytes())
    rewrite(ticket_file, weights={k: v + 100 if v.is_floating_point() else v for k, v in weights.items()},
            record=False)
    with pytest.raises(ValueError, match=rf"{ticket_file} does not match the record written with it: its contents "
                                         "changed"):
        load_ticket(ticket_file)
    assert manifest["kept_weights"] == 369


@pytest.mark.parametrize("damage", ["truncated", "oversized header"])
def test_a_truncated_or_malformed_ticket_is_named_in_our_words(ticket_file, damage):
    payload = ticket_file.read_bytes()
    ticket_file.with_name(ticket_file.name + ".record.json").unlink()  # the file's own checks, not the record's
    if damage == "truncated":
        ticket_file.write_bytes(payload[:40])
    else:
        ticket_file.write_bytes((10 ** 12).to_bytes(8, "little") + payload[8:])
    with pytest.raises(ValueError, match=rf"{ticket_file} is not a complete ticket file: "):
        load_ticket(ticket_file)


def test_a_ticket_reads_in_one_short_line(digits):
    images, labels = digits
    ticket = find_ticket(lenet(), images, labels, sparsity=0.9, epochs=1, batch_size=32)
    text = repr(ticket)
    assert text.startswith(f"Ticket(sparsity 90.00 %, kept {ticket.kept_weights} of 50200 weights; fc1.weight ")
    assert "tensor" not in text and len(text) < 300
