"""Project settings (https://docs.kedro.org/en/stable/configure/configuration_basics/)."""

import warnings

from cts_pipeline.active_config import config_key
from cts_pipeline.context import ProjectContext
from cts_pipeline.hooks import (
    CheckpointHook,
    MlflowHook,
    ResultsPrinterHook,
    RunValidationHook,
    StaleReportHook,
)

# Kedro's own OmegaConf call warns on every config load; nothing for a user to act on.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning)

# Order matters only where a hook says so: RunValidationHook runs first at run start (tryfirst),
# so a bad configuration never opens an MLflow run; StaleReportHook rebuilds a stale report first
# at run end (tryfirst), before it is printed and logged.
HOOKS = (RunValidationHook(), CheckpointHook(), MlflowHook(), ResultsPrinterHook(), StaleReportHook())

# Hands the grid to the pipeline registry and gives each branch its parameters (see context.py).
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
