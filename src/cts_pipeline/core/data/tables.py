"""Someone's own data as Kedro catalog entries (``data.name: catalog``): what the entries load,
made into inputs and labels.

An entry loads either a table (a pandas ``DataFrame``, e.g. from ``pandas.CSVDataset`` or
``pandas.ParquetDataset``) whose feature columns are numbers and whose ``data.label_column`` is
the target, or a dict of tensors (or arrays) with ``inputs`` and ``labels``. Labels that are
integers ``0..C-1`` are kept; any other labels (strings, sparse integers) are numbered in sorted
order of the training labels, and a test label training never shows is refused. Inputs reach the
model as float32, as they are: no scaling (standardise the features in the dataset if the model
needs it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..artifacts.digests import digest
from .registry import DataFileError, DatasetInfo

NAME = "catalog"
INPUT_KEYS = ("inputs", "features", "images", "x")
LABEL_KEYS = ("labels", "targets", "y")


def _from_frame(frame, label_column: str, entry: str) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    if label_column not in frame.columns:
        raise DataFileError(f"catalog entry {entry!r}: no label column {label_column!r} (data.label_column); "
                            f"its columns: {', '.join(map(str, frame.columns[:10]))}")
    features = frame.drop(columns=[label_column])
    if features.shape[1] == 0:
        raise DataFileError(f"catalog entry {entry!r}: no feature column besides {label_column!r}")
    text = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if text:
        raise DataFileError(f"catalog entry {entry!r}: feature columns {text[:5]} are not numeric "
                            "(encode them, or leave them out of the dataset)")
    inputs = features.to_numpy(dtype=np.float32)
    if not np.isfinite(inputs).all():
        rows = np.flatnonzero(~np.isfinite(inputs).all(axis=1))
        raise DataFileError(f"catalog entry {entry!r}: {len(rows)} rows have a missing or infinite feature "
                            f"(e.g. row {int(rows[0])})")
    return inputs, frame[label_column].to_numpy()


def _from_mapping(data: Mapping, entry: str) -> tuple[np.ndarray, np.ndarray]:
    inputs_key = next((k for k in INPUT_KEYS if k in data), None)
    labels_key = next((k for k in LABEL_KEYS if k in data), None)
    if inputs_key is None or labels_key is None:
        raise DataFileError(f"catalog entry {entry!r}: a dict of tensors needs one of {INPUT_KEYS} and one of "
                            f"{LABEL_KEYS}; it has {sorted(map(str, data))[:8]}")
    inputs = torch.as_tensor(data[inputs_key]).to(torch.float32).numpy()
    labels = torch.as_tensor(data[labels_key]).numpy()
    if not np.isfinite(inputs).all():
        raise DataFileError(f"catalog entry {entry!r}: its {inputs_key} hold missing or infinite values")
    return inputs, labels


def inputs_and_labels(data: Any, label_column: str, entry: str) -> tuple[np.ndarray, np.ndarray]:
    """A loaded entry's float32 inputs ``[N, ...]`` and raw labels ``[N]``."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        inputs, labels = _from_frame(data, label_column, entry)
    elif isinstance(data, Mapping):
        inputs, labels = _from_mapping(data, entry)
    else:
        raise DataFileError(f"catalog entry {entry!r} loads a {type(data).__name__}; data.name: catalog takes a "
                            "pandas DataFrame (pandas.CSVDataset, pandas.ParquetDataset) or a dict of tensors")
    if inputs.ndim < 2 or len(inputs) == 0 or labels.shape != (len(inputs),):
        raise DataFileError(f"catalog entry {entry!r}: expected N samples and N labels, got inputs of shape "
                            f"{list(inputs.shape)} and labels of shape {list(labels.shape)}")
    return inputs, labels


def class_numbers(train_labels: np.ndarray, test_labels: np.ndarray, entry: str) -> tuple[np.ndarray, np.ndarray, list]:
    """Labels as class numbers ``0..C-1``: kept where they already are, else numbered in sorted order
    of the training labels. Returns both splits' numbers and the class names."""
    classes = sorted(set(train_labels.tolist()))
    if len(classes) < 2:
        raise DataFileError(f"catalog entry {entry!r}: the training labels hold {len(classes)} class; at least two needed")
    unseen = sorted(set(test_labels.tolist()) - set(classes), key=str)
    if unseen:
        raise DataFileError(f"the test labels {unseen[:5]} never occur in the training data ({entry!r})")
    number = {c: i for i, c in enumerate(classes)}
    return (np.array([number[c] for c in train_labels.tolist()], dtype=np.int64),
            np.array([number[c] for c in test_labels.tolist()], dtype=np.int64), classes)


def load(train: Any, test: Any, label_column: str, entries: tuple[str, str]) -> tuple[
        tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], DatasetInfo, list]:
    """Both entries' float32 inputs and int64 labels, what the model needs to know of them, and the
    class names (the labels as the data give them)."""
    train_inputs, train_raw = inputs_and_labels(train, label_column, entries[0])
    test_inputs, test_raw = inputs_and_labels(test, label_column, entries[1])
    if train_inputs.shape[1:] != test_inputs.shape[1:]:
        raise DataFileError(f"catalog entries {entries[0]!r} and {entries[1]!r} differ in sample shape: "
                            f"{list(train_inputs.shape[1:])} and {list(test_inputs.shape[1:])}")
    train_labels, test_labels, classes = class_numbers(train_raw, test_raw, entries[0])
    info = DatasetInfo(NAME, tuple(int(s) for s in train_inputs.shape[1:]), len(classes), (), (), 1.0, "catalog",
                       inputs_ready=True)
    return ((torch.from_numpy(train_inputs), torch.from_numpy(train_labels)),
            (torch.from_numpy(test_inputs), torch.from_numpy(test_labels)), info, classes)


def contents_digest(*loaded: Any) -> str:
    """A digest of what the entries loaded (a table's columns and values, or the tensors): the
    prepared data record it, so that an entry whose file changed is noticed."""
    import pandas as pd

    parts = []
    for data in loaded:
        if isinstance(data, pd.DataFrame):
            parts.append({"columns": [str(c) for c in data.columns],
                          "rows": torch.from_numpy(pd.util.hash_pandas_object(data, index=False).to_numpy().view(np.int64).copy())})
        elif isinstance(data, Mapping):
            parts.append({str(k): torch.as_tensor(v) for k, v in data.items()})
        else:
            parts.append(repr(type(data)))
    return digest(*parts)
