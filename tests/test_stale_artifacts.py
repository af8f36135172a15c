"""`--only-missing-outputs` recomputes what it cannot trust, and never trains on a mask that is not
the branch's own: every artifact carries a record of itself (``datasets/_records.py``)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from .conftest import latest, run_pipeline

SP50 = "data/07_model_output/smoke/cts_kl-*/seed0/sp50_00/mask.pt"
SP90 = "data/07_model_output/smoke/cts_kl-*/seed0/sp90_00/mask.pt"
SP90_METRICS = "data/08_reporting/smoke/cts_kl-*/seed0/sp90_00/metrics.json"
REPORT = "data/08_reporting/smoke/report-*/cts_results.csv"


def sp90_row(project) -> pd.Series:
    table = pd.read_csv(latest(project, REPORT))
    return table[(table["method"] == "cts_kl") & (table["target_sparsity_pct"] == 90.0)].iloc[0]


def test_a_replaced_mask_is_recomputed_with_what_depends_on_it(finished_project, logged):
    project = finished_project
    before = latest(project, SP90_METRICS)
    shutil.copy(latest(project, SP50), latest(project, SP90))  # the 50 % mask in the 90 % branch's file
    run_pipeline(project, only_missing_outputs=True)
    assert any("does not match what was written" in r.getMessage() and "sp90_00/mask.pt" in r.getMessage()
               and r.levelname == "WARNING" for r in logged)
    assert latest(project, SP90_METRICS) != before, "the branch's evaluation must follow its new mask"
    row = sp90_row(project)
    assert abs(row["achieved_sparsity_pct"] - 90.0) < 0.1, row


def test_a_truncated_mask_under_existing_outputs_is_recomputed(finished_project, logged):
    project = finished_project
    mask = latest(project, SP90)
    mask.write_bytes(mask.read_bytes()[:100])
    run_pipeline(project, only_missing_outputs=True)
    assert any("bytes where" in r.getMessage() for r in logged)
    assert torch.load(latest(project, SP90), weights_only=True)["kept_weights"] > 0


def test_a_mask_copied_with_its_record_is_recomputed_every_time(finished_project, logged):
    """Another sparsity's mask, with its record, in the 90 % branch: nothing looks tampered with,
    but it keeps 1,844 weights where the branch wants 369. Recomputed with everything after it,
    the same way each time, with the branch's metrics kept or removed."""
    project = finished_project
    for attempt, keep_metrics in enumerate((True, False, True)):
        sp90 = latest(project, SP90)
        for suffix in ("", ".record.json"):  # the file and its record: nothing looks tampered with
            shutil.copy(str(latest(project, SP50)) + suffix, str(sp90) + suffix)
        if not keep_metrics:
            for metrics in project.glob(SP90_METRICS):
                shutil.rmtree(metrics)
        logged.clear()
        run_pipeline(project, only_missing_outputs=True)
        assert any("sp90_00/mask.pt" in r.getMessage() and "keeps 1844 of 3688 weights, but its branch wants 369"
                   in r.getMessage() and r.levelname == "WARNING" for r in logged), attempt
        assert torch.load(latest(project, SP90), weights_only=True)["kept_weights"] == 369
        row = sp90_row(project)
        assert row["kept_weights"] == 369 and abs(row["achieved_sparsity_pct"] - 90.0) < 0.1, (attempt, row)


def test_a_mask_replaced_with_its_record_by_one_of_the_same_size_is_recomputed(finished_project, logged):
    """Same kept count, other weights: only the digest its metrics recorded tells them apart."""
    from cts_pipeline.datasets import TorchDataset

    project = finished_project
    sp90 = latest(project, SP90)
    payload = torch.load(sp90, weights_only=True)
    payload["masks"] = {name: keep.flip(-1) for name, keep in payload["masks"].items()}  # same counts per layer
    TorchDataset(filepath=str(sp90)).save(payload)
    run_pipeline(project, only_missing_outputs=True)
    assert any("is not the mask cts_kl.seed0.sp90_00.metrics was computed from" in r.getMessage() for r in logged)
    recomputed = torch.load(latest(project, SP90), weights_only=True)["masks"]
    assert any(not torch.equal(recomputed[name], keep) for name, keep in payload["masks"].items())


def test_metrics_edited_with_their_record_are_evaluated_again(finished_project, logged):
    import json

    from cts_pipeline.datasets import JSONDataset

    project = finished_project
    path = latest(project, SP90_METRICS)
    metrics = json.loads(path.read_text())
    JSONDataset(filepath=str(path)).save({**metrics, "test_accuracy": 99.99})
    run_pipeline(project, only_missing_outputs=True)
    assert any("disagrees with its ticket: evaluated again" in r.getMessage() for r in logged)
    assert json.loads(latest(project, SP90_METRICS).read_text())["test_accuracy"] == metrics["test_accuracy"]
    assert sp90_row(project)["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=0.01)


def test_a_mask_from_another_model_is_refused_naming_the_file(finished_project):
    from cts_pipeline.datasets import TorchDataset

    project = finished_project
    sp90 = latest(project, SP90)
    payload = torch.load(sp90, weights_only=True)
    for part in ("masks", "kept", "total"):
        payload[part] = {f"other.{name}": value for name, value in payload[part].items()}
    dataset = TorchDataset(filepath=str(sp90))
    dataset.save(payload)  # a well-formed file with its record, for other layer names
    for metrics in project.glob(SP90_METRICS):
        shutil.rmtree(metrics)
    with pytest.raises(ValueError, match=r"cts_kl.seed0.sp90_00.mask: mask does not match the model") as err:
        run_pipeline(project, only_missing_outputs=True)
    assert f"file: {sp90}" in err.value.__notes__


def test_outputs_older_than_an_input_rewritten_by_a_partial_run_are_recomputed(finished_project, logged):
    project = finished_project
    before = latest(project, SP90_METRICS)
    mask_node = "cts_kl.seed0.sp90_00.binary_mask"
    run_pipeline(project, node_names=[mask_node])
    run_pipeline(project, only_missing_outputs=True)
    assert any("was written after its outputs" in r.getMessage() for r in logged)
    assert latest(project, SP90_METRICS) != before


def test_a_report_is_rebuilt_when_a_branch_it_summarises_is_recomputed(finished_project):
    project = finished_project
    first = latest(project, REPORT)
    for metrics in project.glob(SP90_METRICS):
        shutil.rmtree(metrics)  # only this branch's evaluation is missing now
    run_pipeline(project, only_missing_outputs=True)
    rebuilt = latest(project, REPORT)
    assert rebuilt != first, "the report must not keep the row of a branch that was recomputed"
    assert len(pd.read_csv(rebuilt)) == 3


def test_nothing_is_recomputed_when_every_artifact_matches_its_record(finished_project, logged):
    project = finished_project
    first = latest(project, REPORT)
    run_pipeline(project, only_missing_outputs=True)
    assert latest(project, REPORT) == first
    assert not [r.getMessage() for r in logged if ": recomputed, " in r.getMessage()]


def test_other_raw_files_under_data_root_recompute_everything_downstream(project, tmp_path, logged):
    """The raw files count in freshness: other MNIST files under the same data.root (here, the
    same images inverted) are noticed, with one warning naming the folder."""
    import numpy as np

    from .core.test_data import write_idx

    raw = tmp_path / "raw-data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (96, 28, 28)), rng.integers(0, 10, 96)
    params = {"data": {"name": "mnist", "root": str(tmp_path / "raw-data")}}
    for prefix in ("train", "t10k"):
        write_idx(raw, prefix, images, labels)
    run_pipeline(project, params=params)
    masks = len(list(project.glob(f"{SP90}/*/")))
    run_pipeline(project, params=params, only_missing_outputs=True)
    assert len(list(project.glob(f"{SP90}/*/"))) == masks, "unchanged raw files: nothing recomputed"
    for prefix in ("train", "t10k"):
        write_idx(raw, prefix, 255 - images, labels)
    logged.clear()
    run_pipeline(project, params=params, only_missing_outputs=True)
    warned = [r.getMessage() for r in logged if r.levelname == "WARNING" and "raw files" in r.getMessage()]
    assert len(warned) == 1 and str(tmp_path / "raw-data") in warned[0], warned
    assert len(list(project.glob(f"{SP90}/*/"))) == masks + 1, "the masks follow the new data"
    [prepared] = project.glob("data/05_model_input/smoke/data-*/train.pt")
    stored = torch.load(prepared, weights_only=True)["images"]
    assert int(stored.float().mean()) == int((255 - images[:len(stored)]).mean()), "prepared from the new files"


def test_an_image_folder_changed_in_place_or_moved_to_another_copy_is_prepared_again(project, tmp_path, logged):
    """Streamed folders count in freshness too: their digest is of each file's path, size and
    modification time and of the folder's resolved path (no image read). One JPEG resized in place,
    or ``data.root`` pointed at a copy with one image changed, is noticed; an unchanged folder is not."""

    from PIL import Image

    from .core.test_image_folders import tiny_imagenet

    images = tmp_path / "images"
    tiny_imagenet(images, per_class=4, noise=60)
    params = {"data": {"name": "tiny_imagenet", "root": str(images)}, "training": {"batch_size": 8},
              "runtime": {"data_workers": 0}}
    run_pipeline(project, params=params)
    masks = len(list(project.glob(f"{SP90}/*/")))
    run_pipeline(project, params=params, only_missing_outputs=True)
    assert len(list(project.glob(f"{SP90}/*/"))) == masks, "an unchanged folder: nothing recomputed"

    def recomputed_after(change) -> list[str]:
        nonlocal masks
        change()
        logged.clear()
        run_pipeline(project, params=params, only_missing_outputs=True)
        assert len(list(project.glob(f"{SP90}/*/"))) == masks + 1, "the masks follow the changed images"
        masks += 1
        return [r.getMessage() for r in logged if r.levelname == "WARNING" and "raw files" in r.getMessage()]

    def prepared_without_a_digest():  # as an earlier version prepared them, with a matching record
        from cts_pipeline.datasets import TorchDataset

        [prepared] = project.glob("data/05_model_input/smoke/data-*/train.pt")
        payload = torch.load(prepared, weights_only=True)
        del payload["raw_digest"]
        TorchDataset(filepath=str(prepared)).save(payload)

    recomputed_after(prepared_without_a_digest)
    assert any("record no digest of their raw files" in r.getMessage() for r in logged)

    [jpeg] = sorted(images.glob("tiny-imagenet-200/train/*/images/*.JPEG"))[:1]
    warned = recomputed_after(lambda: Image.open(jpeg).convert("RGB").resize((48, 48)).save(jpeg))
    assert len(warned) == 1 and str(images) in warned[0], warned

    copy = tmp_path / "copy"

    def point_at_a_copy():
        shutil.copytree(images, copy, copy_function=shutil.copy2)  # modification times kept
        other = sorted(copy.glob("tiny-imagenet-200/train/*/images/*.JPEG"))[-1]
        Image.open(other).convert("RGB").rotate(90).save(other)
        params["data"]["root"] = str(copy)

    assert len(recomputed_after(point_at_a_copy)) == 1
