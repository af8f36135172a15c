"""What happens to a batch of raw pixels on its way into the network, on the device it trains on:
normalisation (uint8 to float32 in one multiply-subtract) and the random crop and flip.

In-memory splits (:mod:`.splits`) and streamed ones (:mod:`.image_folders`) both send raw uint8
batches here, so the bytes that cross to a GPU are a quarter of float32's and the CPUs do no
float arithmetic per pixel.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .registry import DatasetInfo


# (device, dataset) -> (scale, shift) with normalised = pixel * scale - shift. Tiny, and bounded by
# devices x datasets, so cached for the process and never evicted.
@functools.cache
def _norm_constants(device: torch.device, info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(info.mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float64).view(-1, 1, 1)
    # Folding /max_value, -mean and /std into one multiply-subtract halves the passes over
    # the batch; computed in float64 so the fold costs no accuracy.
    scale = (1.0 / (info.max_value * std)).to(torch.float32)
    shift = (mean / std).to(torch.float32)
    return scale.to(device), shift.to(device)


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Raw pixels [B, C, H, W] (uint8 or raw-scale float) to float32 ``(x / max - mean) / std``;
    inputs that are ready as they are (``info.inputs_ready``) are only made float32."""
    if info.inputs_ready:
        return images.to(torch.float32, copy=True)
    channels = info.image_shape[0]
    if images.dim() < 3 or images.shape[-3] != channels:
        raise ValueError(
            f"normalize: expected images [B, {channels}, H, W] for dataset {info.name!r}, "
            f"got {list(images.shape)}"
        )
    scale, shift = _norm_constants(images.device, info)
    # copy=True: float32 input would otherwise be returned as-is and modified in place below.
    out = images.to(torch.float32, copy=True)
    return out.mul_(scale).sub_(shift)


def draw_crop_flip(
    n: int, pad: int, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets (top, left in [0, 2*pad]) and flip flags, like RandomCrop + Flip."""
    gen_device = generator.device if generator is not None else device
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gen_device)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gen_device)
    flip = torch.rand(n, generator=generator, device=gen_device) < 0.5
    return top.to(device), left.to(device), flip.to(device)


CROP_PADDINGS = ("zeros", "reflect")


def crop_flip(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, pad: int,
    padding: str = "zeros",
) -> torch.Tensor:
    """Pad a batch by ``pad`` (zeros, or the image mirrored at its edge), crop each image at its
    own offset, mirror those flagged.

    Equivalent per image to torchvision ``RandomCrop(size, padding=pad, padding_mode=padding)``
    followed by a horizontal flip, but done as one gather over the whole batch. Reflection is read
    straight from the image through mirrored indices (``reflect``: the edge pixel not repeated, as
    ``F.pad``), so it needs no padded copy and works on raw uint8 on any device.
    """
    b, c, h, w = images.shape
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    rows = top[:, None] + ys  # [B, H]
    # Flipping the crop is reading its columns right to left, so flip the index, not the image.
    cols = left[:, None] + torch.where(flip[:, None], (w - 1) - xs, xs)  # [B, W]
    if padding == "reflect":
        source, rows, cols = images, _reflect(rows - pad, h), _reflect(cols - pad, w)
    else:
        source = F.pad(images, (pad, pad, pad, pad))  # zeros: black in raw pixel values
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chans = torch.arange(c, device=images.device)[None, :, None, None]
    return source[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Positions in a line of ``size`` pixels mirrored at its edges: −1 → 1, size → size − 2."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)
