"""Count the aten operations a block dispatches: what a launch-bound GPU pays for, counted on a CPU.

A small network's step on a GPU (ResNet-20 at batch 512) is bound by kernel launches, not
arithmetic, so the number of operations it dispatches predicts its GPU time better than its CPU
time does, and it can be counted where there is no GPU (``benchmarks/launches.py``; the tests that
check a fast path dispatches what it promises). Views (``view``, ``detach``, ``t``, …) are counted
but launch no kernel: :attr:`DispatchedOps.kernels` leaves them out.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class DispatchedOps(TorchDispatchMode):
    """Within ``with DispatchedOps() as ops:``, every aten operation dispatched below autograd, as
    ``(name, output dtype)`` in :attr:`calls`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object]] = []
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (list, tuple)) and out else out
        self.calls.append((func.overloadpacket.__name__, getattr(first, "dtype", None)))
        self.views += func.is_view
        return out

    def __len__(self) -> int:
        return len(self.calls)

    @property
    def kernels(self) -> int:
        """The operations that are not views of their input."""
        return len(self.calls) - self.views

    def named(self, *names: str) -> list[tuple[str, object]]:
        return [c for c in self.calls if c[0] in names]
