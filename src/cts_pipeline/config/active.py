"""Which configuration the pipeline registry builds the sweep from.

The grid shapes the DAG, but Kedro calls ``register_pipelines()`` without arguments. The session's
config loader knows the chosen environment (``--env``) and ``--params`` overrides, so
:class:`cts_pipeline.framework.context.ProjectContext` hands it over here when it is created (always before a
run or ``kedro viz`` reads the pipelines). Without a session (a bare ``import``, tests) the
registry falls back to the project's configuration for ``$KEDRO_ENV``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_config_loader: Any = None


def remember(config_loader: Any) -> None:
    global _config_loader
    _config_loader = config_loader


def forget() -> None:
    global _config_loader
    _config_loader = None


def config_loader() -> Any:
    """The session's config loader, or the project's for ``$KEDRO_ENV`` without a session."""
    return _config_loader if _config_loader is not None else project_config_loader(os.getenv("KEDRO_ENV"))


def parameters(loader: Any = None) -> dict[str, Any]:
    """The raw parameters (environment merged over base, runtime overrides applied).

    Read once per config loader: the catalog resolves ``${config_key:…}`` in every entry, and each
    read of ``parameters`` makes Kedro load and merge the YAML files again (about 80 ms; 1.7 s of a
    smoke run's 5 s were spent here). A loader belongs to one session and its ``--params``; a
    session opened after a file changed gets a new loader, so nothing stale is served."""
    loader = loader if loader is not None else config_loader()
    cached = getattr(loader, "_cts_parameters", None)
    if cached is None:
        cached = dict(loader["parameters"])
        try:
            loader._cts_parameters = cached
        except AttributeError:  # a loader that takes no attributes is simply read each time
            pass
    return dict(cached)


def project_config_loader(env: str | None = None, conf_source: str | None = None,
                          runtime_params: dict | None = None) -> Any:
    """The project's config loader, built as a session builds it, for code that runs without one."""
    from kedro.framework.project import settings
    from kedro.utils import find_kedro_project

    # (src/cts_pipeline/config/active.py: the project is three folders up)
    project = find_kedro_project(Path.cwd()) or Path(__file__).resolve().parents[3]
    return settings.CONFIG_LOADER_CLASS(
        conf_source=conf_source or str(Path(project) / settings.CONF_SOURCE),
        env=env,
        runtime_params=runtime_params or {},
        **settings.CONFIG_LOADER_ARGS,
    )


def config_key(scope: str) -> str:
    """Digest of the parameters artifacts depend on (``${config_key:runs}`` in the catalog).

    Artifacts live under their key, so ``kedro run --only-missing-outputs`` skips exactly the
    branches already computed with this configuration, and a changed setting never reuses a
    stale result: a new ``cts.*`` choice is a new branch name, a new recipe a new key. What enters
    the key is decided in :mod:`cts_pipeline.config.identity`.
    """
    from .identity import catalog_key

    return catalog_key(parameters(), scope)
