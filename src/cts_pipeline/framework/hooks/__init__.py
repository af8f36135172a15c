"""Project hooks: checks at run start, MLflow tracking, freshness, checkpoints and the results table.

Tracking and the results table read what the nodes produced from the catalog, in the driver
process, after it was saved (``framework/tracking.py`` says why). So they work the same under the
SequentialRunner, the ThreadRunner, Kedro's ParallelRunner (whose workers run node hooks in
their own processes) and :class:`cts_pipeline.runners.DaskRunner`. One module per hook:

- :mod:`.validation`: ``RunValidationHook`` (the whole configuration before the first node; node
  errors marked as such) and ``ArtifactPathHook`` (the file behind a refused artifact);
- :mod:`.freshness`: ``FreshnessHook`` (``--only-missing-outputs`` recomputes what is stale);
- :mod:`.checkpoints`: ``CheckpointHook`` (a node's checkpoints go once its outputs are saved);
- :mod:`.mlflow_runs`: ``MlflowHook``;
- :mod:`.results`: ``ResultsPrinterHook``;
- :mod:`.viz`: ``VizStatsHook`` (kedro-viz's run statistics kept per preset);
- :mod:`.run_identity`: ``RunIdentityHook`` (the results rows name their run, preset and commit);
- :mod:`.catalog`: what they share in reading the catalog.
"""

from .checkpoints import CheckpointHook
from .freshness import FreshnessHook
from .mlflow_runs import MlflowHook
from .results import ResultsPrinterHook, print_tables
from .run_identity import RunIdentityHook
from .validation import ArtifactPathHook, RunValidationHook, check_writable
from .viz import VizStatsHook

__all__ = ["ArtifactPathHook", "CheckpointHook", "FreshnessHook", "MlflowHook", "ResultsPrinterHook",
           "RunIdentityHook", "RunValidationHook", "VizStatsHook", "check_writable", "print_tables"]
