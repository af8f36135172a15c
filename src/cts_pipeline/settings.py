"""Project settings (https://docs.kedro.org/en/stable/configure/configuration_basics/)."""

import os
import warnings

from cts_pipeline.config.active import config_key
from cts_pipeline.framework.context import ProjectContext
from cts_pipeline.framework.hooks import (
    ArtifactPathHook,
    CheckpointHook,
    FreshnessHook,
    MlflowHook,
    ResultsPrinterHook,
    RunIdentityHook,
    RunValidationHook,
    VizStatsHook,
)
from cts_pipeline.terminal.progress import SweepProgressHook

# Kedro's own OmegaConf call warns on every config load; nothing for a user to act on.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning)
# MLflow's sqlite store, on SQLAlchemy 2.1: a deprecation inside MLflow, nothing a user can change.
warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated")

# --runner=ParallelRunner starts its processes by forking on Linux. A fork of this process (torch's
# thread pools, MLflow's and the queue's threads already running) deadlocked: the workers waited
# for tasks that the parent had submitted. Kedro's own setting picks spawn instead; set
# KEDRO_MP_CONTEXT to choose otherwise.
os.environ.setdefault("KEDRO_MP_CONTEXT", "spawn")

# Order matters only where a hook says so: RunValidationHook runs first at run start (tryfirst),
# so a bad configuration never opens an MLflow run.
HOOKS = (RunValidationHook(), RunIdentityHook(), FreshnessHook(), ArtifactPathHook(), CheckpointHook(), MlflowHook(),
         ResultsPrinterHook(), SweepProgressHook(), VizStatsHook())

# Hands the grid to the pipeline registry and gives each branch its parameters (see framework/context.py).
CONTEXT_CLASS = ProjectContext

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Presets (conf/<preset>/) override single keys of base without restating whole sections.
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"], "dask": ["dask*", "dask*/**"]},
    # ${config_key:<scope>} in catalog paths: a digest of the parameters a stage depends on.
    "custom_resolvers": {"config_key": config_key},
}
