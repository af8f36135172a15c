"""What every node needs to turn parameters and catalog payloads into torch objects and back.

Catalog payloads are plain containers of CPU tensors (``torch.load(weights_only=True)`` reads
them anywhere); nodes move what they use to the run's device and hand CPU copies back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..config import ModelConfig, RuntimeConfig
from ..core.data import Split, get_dataset_info
from ..core.runtime import generator, resolve_device


def device_for(runtime: RuntimeConfig) -> torch.device:
    if runtime.num_threads is not None:
        torch.set_num_threads(runtime.num_threads)
    return resolve_device(runtime.device)


def split_to_payload(split: Split) -> dict:
    return {"dataset": split.info.name, "images": split.images.cpu(), "labels": split.labels.cpu()}


def split_from_payload(payload: Mapping, device: torch.device) -> Split:
    info = get_dataset_info(payload["dataset"])
    return Split(images=payload["images"], labels=payload["labels"], info=info).to(device)


def build_network(
    model: ModelConfig, split: Split, device: torch.device, *,
    seed: int | None = None, state: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The configured model for ``split``'s dataset on ``device``: fresh from ``seed``, or loaded from ``state``."""
    init = generator("cpu", seed, "model-init") if seed is not None else None
    net = model.build(split.info.image_shape, split.info.num_classes, generator=init)
    if state is not None:
        net.load_state_dict(state)
    return net.to(device)


def state_on_cpu(net: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the weights and buffers (what a catalog entry stores)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
