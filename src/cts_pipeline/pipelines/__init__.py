"""Kedro pipelines: thin nodes that call :mod:`cts_pipeline.core`, one folder per pipeline."""
