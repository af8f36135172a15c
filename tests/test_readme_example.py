"""The README's Python examples run as written, end to end: after a (smoke) run for the ticket
it loads, and on scikit-learn's digits for the model it searches, retrains and prunes."""

from __future__ import annotations

import contextlib
import io
import re

from .conftest import PROJECT_ROOT


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readmes_python_examples_run_as_written(finished_project):
    blocks = python_blocks((PROJECT_ROOT / "README.md").read_text())
    assert len(blocks) >= 2, "the README shows load_ticket and find_ticket"
    namespace: dict = {"__name__": "readme"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:  # in the project folder of a finished run, as a reader would run them
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("cts_kl 0.9"), lines[0]  # the smoke run's ticket: method and sparsity
    ticket_line = next(line for line in lines if line.startswith("Ticket("))
    shown = re.search(r"^print\(ticket\)  # (Ticket\(sparsity [^;]+;)", "\n".join(blocks), flags=re.M)[1]
    assert ticket_line.startswith(shown), f"the README's comment shows {shown!r}; the example prints {ticket_line!r}"
    accuracy = float(lines[-1])
    assert 50.0 < accuracy <= 100.0, "a 90 % sparse ticket of the small convnet, retrained 10 epochs on digits"
    model = namespace["my_model"]
    assert int(model[0].weight_mask.sum()) + int(model[3].weight_mask.sum()) + int(model[5].weight_mask.sum()) \
        == namespace["ticket"].kept_weights
    assert namespace["some"].dense_layers == ("0.weight", "5.weight")
