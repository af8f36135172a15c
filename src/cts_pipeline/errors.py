"""What a failed run tells its user: one line, and an exit code that says which kind of failure.

The code is read off the exception itself, never off state a hook left behind, so it is the same
under every runner (a ParallelRunner's node fails in another process; a Dask node on another
machine):

* **2, the run's input**: the configuration, the data files, the tracking store. Found before any
  compute could help, whether at run start (``validate_run``) or by the node that reads the data.
* **1, a failed run**: a node raised, or an artifact could not be loaded or saved.

A node's error is marked as such where it happens (``hooks.RunValidationHook.on_node_error``,
which Kedro calls in the process that ran the node, and the DaskRunner in its driver); the mark is
an attribute of the exception. A ParallelRunner worker runs no project hook, so there the error's
origin in a worker process is the mark.
"""

from __future__ import annotations

from pathlib import Path

# Searches cut their batches and stacked retraining caps its tickets to fit (core/train/memory.py), but
# a training step runs the recipe's whole batch, and only the recipe can change that.
OUT_OF_MEMORY_HINT = ("a training step takes the recipe's whole batch at once: lower training.batch_size, or set "
                      "training.virtual_ranks: N to run each batch as N chunks, each with its own BatchNorm "
                      "statistics (a change of recipe)")

CONFIGURATION_EXIT = 2
FAILED_RUN_EXIT = 1
INTERRUPTED_EXIT = 130  # the shell's convention for a run stopped by SIGINT (128 + 2)

FAILED_NODE = "cts_failed_node"  # the attribute that names the node an error came from


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be used (an input error, exit 2); the message is one line for the
    user. Defined here rather than in ``tracking`` so that this module imports nothing that uses it."""


def first_line(exc: BaseException) -> str:
    """An error as one short line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def input_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the run's input cannot be used", wherever they are raised."""
    import yaml
    from kedro.config import MissingConfigException

    from .config.typed import ConfigError
    from .core.data.registry import DataFileError, DatasetNotFoundError
    from .runners import SchedulerUnreachable

    return (ConfigError, DataFileError, DatasetNotFoundError, TrackingUnavailable, SchedulerUnreachable,
            MissingConfigException, yaml.YAMLError)


def mark_failed_node(error: BaseException, node_name: str) -> None:
    try:
        setattr(error, FAILED_NODE, node_name)
    except AttributeError:  # an exception type with __slots__: it stays unmarked, so counts as input
        pass


def causes(error: BaseException | None):
    """``error`` and the exceptions it was raised from, outermost first (none for ``None``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__


def _from_a_worker(error: BaseException) -> bool:
    """Raised in a process pool's worker and handed back: ``concurrent.futures`` chains such an
    error to the worker's traceback. Kedro's ParallelRunner runs only nodes there, and its workers
    run no project hook (Kedro bootstraps them only under a global spawn start method), so this is
    how the driver knows a node failed."""
    return type(error.__cause__).__name__ == "_RemoteTraceback"


def exit_code(error: BaseException) -> int:
    from kedro.io import DatasetError

    from .runners import DaskNodeError

    chain = list(causes(error))
    if any(isinstance(e, input_error_types()) for e in chain):
        return CONFIGURATION_EXIT
    if any(getattr(e, FAILED_NODE, None) or isinstance(e, DatasetError | DaskNodeError) or _from_a_worker(e)
           for e in chain):
        return FAILED_RUN_EXIT
    return CONFIGURATION_EXIT  # raised before any node ran: the project's or Kedro's set-up refused it


def yaml_problem(error: BaseException, conf: Path) -> str | None:
    """One line naming the file and the key for a YAML error Kedro's loader raised: it parses
    streams, so PyYAML's message says ``in "<file>"`` and spreads over four lines."""
    import yaml

    if not isinstance(error, yaml.MarkedYAMLError) or "<file>" not in str(error):
        return None
    for path in sorted(conf.rglob("*.y*ml")):
        try:
            with path.open(encoding="utf8") as stream:
                yaml.load(stream, Loader=_unique_key_loader())
        except yaml.MarkedYAMLError as found:
            if found.problem == error.problem:
                mark = found.problem_mark
                return f"{path}, line {mark.line + 1}: {found.problem}" + (
                    f" ({found.context} at line {found.context_mark.line + 1})" if found.context_mark else "")
        except (OSError, yaml.YAMLError):
            continue
    return " ".join(line.strip() for line in str(error).splitlines())


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """Refuses a key given twice in one mapping, as Kedro's loader does."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key}",
                        key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return Loader


def describe(error: BaseException) -> tuple[str, int]:
    """The user's message for ``error`` and the exit code."""
    from kedro.io import DatasetError

    code = exit_code(error)
    # Kedro wraps a failed load or save in a DatasetError whose message opens with the dataset's
    # long repr; a disk's or a file system's own error (it names the file) is what the user needs.
    beneath = next((e for e in causes(error) if not isinstance(e, DatasetError)), error)
    shown = beneath if isinstance(error, DatasetError) and isinstance(beneath, OSError) else error
    text = yaml_problem(shown, Path.cwd() / "conf") or str(shown).strip() or type(shown).__name__
    notes = [n for n in getattr(error, "__notes__", ()) if n]
    if notes:  # e.g. the file behind a refused artifact (hooks.ArtifactPathHook)
        text = f"{text} ({'; '.join(notes)})"
    if code == FAILED_RUN_EXIT:
        name = type(shown).__name__
        text = text if text.startswith(name) else f"{name}: {text}"
    if any(type(e).__name__ == "OutOfMemoryError" for e in causes(error)):
        text = f"{text.splitlines()[0]} ({OUT_OF_MEMORY_HINT})"
    return text, code
