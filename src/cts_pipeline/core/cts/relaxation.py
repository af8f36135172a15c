"""The Binary Concrete relaxation of the mask: logits, noise, soft masks and the masked weights."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..device.runtime import UniformNoise
from ..nets.masks import unflatten

TEMPERATURE = 2.0 / 3.0  # fixed: no annealing, no straight-through, no hard-concrete stretch
NOISE_EPS = 1e-10  # keeps log u finite; torch.rand never returns 1, so only the floor matters


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def concrete_noise(num: int, source: UniformNoise, device: torch.device,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``L = log u − log(1 − u)`` with ``u ~ U(0, 1)``: standard logistic noise, one value per weight.

    Computed as ``logit(u)`` in place in ``out`` (one kernel; CPU ``log1p`` alone costs more than a
    whole dense training step of LeNet-300-100). ``eps`` clamps ``u`` to ``[1e-10, 1 − 1e-10]``,
    which in float32 only lifts exact zeros: uniform draws never return 1.
    """
    u = torch.empty(num, device=device) if out is None else out
    source.fill_(u)
    return torch.logit(u, eps=NOISE_EPS, out=u)


def soft_mask(logits: torch.Tensor, noise: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Binary Concrete sample ``σ(s + L/τ)`` (the scale and the sum in one kernel)."""
    return torch.sigmoid(torch.add(logits, noise, alpha=1.0 / temperature))


class ConcreteMask:
    """One flat logit buffer over every prunable weight, with per-layer views of the masked weights.

    ``θ_k`` is copied once into a flat frozen buffer, so a step computes ``θ ⊙ m̃`` in one
    elementwise product and hands the network views of it (no per-layer copies).

    With a sequence of densities the logits are ``[K, d]``, one row per density, all over the same
    ``θ_k``. A step draws one noise vector ``[d]`` and shares it by every row: a single search at
    density ``κ_k`` with the same seed draws exactly that vector (the noise stream depends on the
    seed and the epoch only), so row ``k`` is that search.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], density: float | Sequence[float]):
        self.shapes = {name: w.shape for name, w in weights.items()}
        self.theta = torch.cat([w.detach().reshape(-1) for w in weights.values()])
        if isinstance(density, Sequence):
            start = torch.tensor([logit(k) for k in density], dtype=self.theta.dtype, device=self.theta.device)
            self.logits = start[:, None].repeat(1, self.theta.numel()).requires_grad_(True)
        else:
            self.logits = torch.full_like(self.theta, logit(density), requires_grad=True)
        self._noise = torch.empty_like(self.theta)
        self.stacked = False  # K rows through stacked_forward (set once the search has checked it)

    @property
    def batched(self) -> bool:
        return self.logits.dim() == 2

    def sample(self, source: UniformNoise) -> torch.Tensor:
        """This step's soft mask(s): one fresh noise draw per weight, shared by the batch and the rows."""
        noise = concrete_noise(self.num_weights, source, self.theta.device, out=self._noise)
        return soft_mask(self.logits, noise)

    def soft_from_last_noise(self) -> torch.Tensor:
        """The soft mask(s) of the last :meth:`sample` again, with a fresh graph to the logits and no
        new draw (a step repeated after an out-of-memory error computes what the first try would)."""
        return soft_mask(self.logits, self._noise)

    @property
    def num_weights(self) -> int:
        return self.theta.numel()

    def masked_weights(self, soft: torch.Tensor) -> dict[str, torch.Tensor]:
        return unflatten(self.theta * soft, self.shapes)

    def row_weights(self, masked: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[K, d]`` masked weights as ``{name: [K, *shape]}`` (one copy per layer)."""
        sizes = [math.prod(shape) for shape in self.shapes.values()]
        parts = torch.split(masked, sizes, dim=1)
        return {name: part.reshape(masked.shape[0], *shape)
                for (name, shape), part in zip(self.shapes.items(), parts, strict=True)}

    def scores(self, row: int | None = None) -> dict[str, torch.Tensor]:
        """The learned logits per layer (on the CPU), of one row when batched: rank them for the mask."""
        logits = self.logits.detach() if row is None else self.logits.detach()[row]
        return {n: t.clone() for n, t in unflatten(logits.cpu(), self.shapes).items()}
