"""`--only-missing-outputs` recomputes what is stale: unrecorded, older than an input, or disagreeing."""

from __future__ import annotations

import logging
from typing import Any

from kedro.framework.hooks import hook_impl

from ...config.sections import typed_sections
from ...datasets._records import NO_RECORD, RecordedArtifact, check_file
from ...errors import first_line
from .catalog import artifact_path, load_fresh

logger = logging.getLogger(__name__)


class FreshnessHook:
    """Make ``--only-missing-outputs`` safe: recompute what it would otherwise trust blindly.

    Kedro's filter reruns a node only when an output is missing. Before it runs, this hook flags
    as stale (so, missing) the outputs of every node
    - whose stored file no longer matches its record (truncated or replaced, ``datasets/_records.py``),
      or has none;
    - one of whose inputs is recomputed in this run (a branch's evaluation after its retraining,
      a report after any branch it summarises);
    - one of whose inputs was written after its outputs (by a partial run, ``--nodes``).
    - whose outputs disagree with what they were computed from, whatever the records say (a file
      replaced together with its record matches it): prepared data built from other raw files; a
      mask whose digest, kept count or target density is not what its branch's metrics record or
      its branch wants (the mask is recomputed, and everything after it); metrics that disagree
      with their ticket.
    Flags travel with the catalog, so this holds under every runner.
    """

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if not run_params.get("only_missing_outputs"):
            return
        producer = {name: node for node in pipeline.nodes for name in node.outputs}
        disagreeing = self._disagreeing(pipeline, catalog, producer)
        rerun: set[Any] = set()
        written: dict[str, float] = {}
        for node in pipeline.nodes:  # in topological order
            stored = {name: catalog.get(name) for name in node.outputs if name in catalog}
            stored = {name: ds for name, ds in stored.items() if isinstance(ds, RecordedArtifact)}
            if not stored:
                continue
            if not all(catalog.exists(name) for name in stored):
                rerun.add(node)  # Kedro reruns it; what depends on it must follow
                continue
            damaged = self._damaged(stored, written) or disagreeing.get(node)
            reason = damaged or self._outdated(node, stored, producer, rerun, written)
            if reason:
                rerun.add(node)
                for dataset in stored.values():
                    dataset.mark_stale()
                # A damaged file is news to the user; following a recomputed input is routine.
                (logger.warning if damaged else logger.info)("%s: recomputed, %s", node.name, reason)

    @staticmethod
    def _disagreeing(pipeline, catalog, producer: dict) -> dict[Any, str]:
        """The nodes whose stored outputs contradict their inputs, each with the reason."""
        from ...core.nets.masks import kept_count, mask_digest, payload_to_mask
        from ...pipelines.data_processing.nodes import current_raw_digest

        found: dict[Any, str] = {}
        prepared = producer.get("train_data")
        if prepared is not None and catalog.exists("train_data"):
            data = typed_sections(catalog.load("parameters"))["data"]
            recorded = load_fresh(catalog, "train_data").get("raw_digest")
            current = current_raw_digest(data, catalog.load)
            if recorded is None and current is not None:
                found[prepared] = (f"the prepared data of dataset {data.name!r} record no digest of their raw files "
                                   "(prepared by an earlier version), so they cannot be checked: they are prepared "
                                   "again, with everything computed from them")
            elif recorded != current:
                where = f"entries {data.train!r} and {data.test!r}" if data.name == "catalog" else f"files under {data.root}"
                found[prepared] = (f"the raw {where} of dataset {data.name!r} changed since the data "
                                   "were prepared: everything computed from them is recomputed")
        masks: dict[str, tuple[dict, dict]] = {}  # stored masks that agree with their branch
        for name in (n for n in producer if n.endswith(".mask") and catalog.exists(n)):
            where = artifact_path(catalog, name)
            try:
                payload = load_fresh(catalog, name)
                keep = payload_to_mask(payload)
            except Exception as exc:  # unreadable, or inconsistent in itself: its producer redoes it
                found[producer[name]] = f"{where} cannot be read as a mask ({first_line(exc)})"
                continue
            branch_param = f"params:{name.removesuffix('.mask')}.branch"
            branch = catalog.load(branch_param) if branch_param in catalog else None
            kept, total = payload["kept_weights"], payload["prunable_weights"]
            if branch is not None and branch.family != "ltr" and kept != kept_count(branch.density, total):
                found[producer[name]] = (f"{where} keeps {kept} of {total} weights, but its branch wants "
                                         f"{kept_count(branch.density, total)} (density {branch.density:.6g}): "
                                         "the mask is recomputed with everything after it")
            else:
                masks[name] = (payload, keep)
        for node in pipeline.nodes:
            metrics = next((n for n in node.outputs if n.endswith(".metrics")), None)
            mask = next((n for n in node.inputs if n in masks), None)
            if metrics is None or mask is None or not catalog.exists(metrics):
                continue
            payload, keep = masks[mask]
            recorded = load_fresh(catalog, metrics)
            if recorded.get("mask_digest") not in (None, mask_digest(keep)) \
                    or recorded.get("kept_weights") != payload["kept_weights"]:
                found[producer[mask]] = (f"{artifact_path(catalog, mask)} is not the mask {metrics} was computed "
                                         f"from (it keeps {payload['kept_weights']} weights, the metrics say "
                                         f"{recorded.get('kept_weights')}): the mask is recomputed with everything "
                                         "after it")
                continue
            ticket = metrics.removesuffix(".metrics") + ".ticket"
            manifest = load_fresh(catalog, ticket)["manifest"] if catalog.exists(ticket) else None
            if manifest is not None and any(manifest.get(k) != recorded.get(k)
                                            for k in ("test_accuracy", "kept_weights", "mask_digest")):
                found[node] = f"{artifact_path(catalog, metrics)} disagrees with its ticket: evaluated again"
        return found

    @staticmethod
    def _damaged(stored: dict, written: dict[str, float]) -> str | None:
        """The first stored output that does not match its record; else each one's write time."""
        for name, dataset in stored.items():
            path = dataset.load_path()
            record, problem = check_file(dataset._fs, path)
            if problem:
                return f"{path}: {problem}" if problem == NO_RECORD \
                    else f"{path} does not match what was written: {problem}"
            written[name] = record.get("written_at", 0.0)
        return None

    @staticmethod
    def _outdated(node, stored: dict, producer: dict, rerun: set, written: dict[str, float]) -> str | None:
        recomputed = [name for name in node.inputs if producer.get(name) in rerun]
        if recomputed:
            return f"its input {recomputed[0]} is recomputed in this run"
        oldest_output = min(written[name] for name in stored)
        newer = [name for name in node.inputs if written.get(name, 0.0) > oldest_output]
        if newer:
            return f"its input {newer[0]} was written after its outputs"
        return None
