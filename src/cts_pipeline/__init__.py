"""cts-pipeline: Concrete Ticket Search (CTS-KL) lottery tickets as a Kedro project.

``find_ticket`` and ``load_ticket`` (``cts_pipeline.api``) are the one-call API for notebooks.
"""

__version__ = "0.1.0"

__all__ = ["find_ticket", "load_ticket", "Ticket"]


def __getattr__(name: str):
    # Imported on first use: every `kedro` command imports this package, and torch is slow to load.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'cts_pipeline' has no attribute {name!r}")
