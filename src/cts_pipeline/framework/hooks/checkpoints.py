"""The checkpoints of a node's loops go once its outputs are saved, and stay if saving failed."""

from __future__ import annotations

from typing import Any

from kedro.framework.hooks import hook_impl

from ...core.artifacts.checkpoints import PendingRemovals


class CheckpointHook:
    """A node's per-epoch checkpoints are removed only once all its outputs are saved: a failed
    save (a full disk, a dead store) then costs nothing, since the rerun resumes from them."""

    def __init__(self) -> None:
        self.unsaved: dict[Any, set[str]] = {}
        self.pending: dict[Any, PendingRemovals] = {}

    @hook_impl
    def before_node_run(self, node) -> None:
        self.pending[node] = PendingRemovals.start()
        self.unsaved[node] = set(node.outputs)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, node) -> None:
        left = self.unsaved.get(node)
        if left is not None:
            left.discard(dataset_name)
            if not left:
                del self.unsaved[node]
                self._end(node).remove()

    @hook_impl
    def after_node_run(self, node, outputs: dict[str, Any]) -> None:
        if node.outputs and outputs:
            return  # their saves come next
        self.unsaved.pop(node, None)
        if not node.outputs:
            self._end(node).remove()
        else:  # a runner that ran the node elsewhere (DaskRunner) cleans up there
            self._end(node).keep()

    @hook_impl
    def on_node_error(self, node) -> None:
        self.unsaved.pop(node, None)
        self._end(node).keep()

    def _end(self, node) -> PendingRemovals:
        """The node's set, no longer tracked here (an empty one if the node never started here)."""
        return self.pending.pop(node, None) or PendingRemovals()
