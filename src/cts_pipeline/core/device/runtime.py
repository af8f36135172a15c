"""Where the work runs: device choice, what this CPU's kernels cannot do, seeding streams and a
plain description of the hardware."""

from __future__ import annotations

import logging
import os
import platform
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")  # and cuda:N


def check_device_choice(choice: object) -> str:
    """``choice`` if it is a device this project can be told to use, whether or not this machine
    has it (``resolve_device`` checks that); else a ValueError naming ``runtime.device``."""
    if not isinstance(choice, str) or not re.fullmatch(rf"{'|'.join(DEVICE_CHOICES)}|cuda:\d+", choice):
        raise ValueError(f"runtime.device must be one of {', '.join(DEVICE_CHOICES)} or cuda:N, got {choice!r}")
    return choice


def resolve_device(choice: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present, else the CPU; ``cuda[:n]`` must be available."""
    if check_device_choice(choice) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"runtime.device is {choice!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return device


def channels_last_hazard(model: torch.nn.Module, device: torch.device | str) -> str | None:
    """The layer of ``model`` whose backward pass corrupts memory in NHWC on this device, or None.

    torch 2.14.1's oneDNN (3.12), on AVX2 CPUs: a strided 1x1 convolution in channels_last with
    2 to 6 input channels writes outside its buffers in the backward pass ("double free or
    corruption", a segfault, or a hang; ``nn.Conv2d(4, 8, 1, stride=2)``, as the shortcut of a
    ResNet-20 of width 4). 1, 7, 8, 9 and 12 channels, 3x3 kernels, stride 1, the forward pass,
    NCHW and oneDNN's SSE4.1 path are fine. Any input width below 8 counts here, to be safe. GPUs
    run cuDNN and are not affected."""
    if torch.device(device).type != "cpu":
        return None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) \
                and max(module.stride) > 1 and module.in_channels < 8:
            return name
    return None


@dataclass(frozen=True)
class CudaPolicy:
    """How CUDA computes, chosen once per run (``runtime.tf32``, ``runtime.deterministic``) rather
    than left to torch's defaults, and named on the hardware line of every result.

    - ``tf32``: fp32 matmuls and convolutions in TF32 on Ampere and later (about 8x the fp32
      throughput; 10-bit mantissas in the products, fp32 sums). Ignored before Ampere.
    - ``benchmark``: cuDNN times its algorithms once per shape and keeps the fastest: the loops'
      shapes are fixed, so this pays off from the second step. Off under ``deterministic``.
    - ``deterministic``: ``torch.use_deterministic_algorithms`` with cuBLAS's workspace setting, so a
      GPU run repeats to the bit (slower; a CPU run repeats to the bit without it).
    """

    tf32: bool = True
    deterministic: bool = False

    @property
    def benchmark(self) -> bool:
        return not self.deterministic

    def apply(self, device: torch.device) -> None:
        if device.type != "cuda":
            return
        ampere = torch.cuda.get_device_capability(device)[0] >= 8
        set_tf32(self.tf32 and ampere)
        torch.backends.cudnn.benchmark = self.benchmark
        if self.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic; read when cuBLAS starts.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(self.deterministic)

    @staticmethod
    def describe() -> str:
        """The flags as torch holds them now (whoever set them): matmuls and convolutions apart,
        since cuDNN's convolutions default to TF32 where cuBLAS's matmuls do not."""
        matmul, conv = tf32_modes()
        return (f"TF32 matmul {'on' if matmul else 'off'}, TF32 conv {'on' if conv else 'off'}, "
                f"cudnn.benchmark {'on' if torch.backends.cudnn.benchmark else 'off'}"
                f"{', deterministic' if torch.are_deterministic_algorithms_enabled() else ''}")


# torch 2.9 replaced ``allow_tf32`` with ``fp32_precision`` per backend and refuses to read a flag
# through one API once the other has set it, so both directions go through these two functions.
_NEW_TF32_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def set_tf32(on: bool) -> None:
    """TF32 for fp32 matmuls (cuBLAS) and convolutions (cuDNN), on or off together."""
    if _NEW_TF32_API:
        torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def tf32_modes() -> tuple[bool, bool]:
    """Whether fp32 matmuls and fp32 convolutions run in TF32 now, as (matmul, conv)."""
    if not _NEW_TF32_API:
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def resolved(*levels: str) -> bool:  # "none" inherits from the level above; at the top, IEEE
        return next((level for level in levels if level != "none"), "ieee") == "tf32"

    return (resolved(torch.backends.cuda.matmul.fp32_precision, torch.backends.fp32_precision),
            resolved(torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.fp32_precision,
                     torch.backends.fp32_precision))


def precision_label(precision: str, device: torch.device) -> str:
    """What a table calls a step's arithmetic: fp32 on CUDA names what TF32 does to it now (the
    convolutions may run in TF32 while the matmuls do not)."""
    if precision != "fp32" or device.type != "cuda":
        return precision
    matmul, conv = tf32_modes()
    if matmul == conv:
        return "fp32 (TF32 on)" if matmul else "fp32 (IEEE, TF32 off)"
    return f"fp32 (TF32 {'matmuls' if matmul else 'convolutions'} only)"


def training_device(choice: str = "auto", policy: CudaPolicy | None = None) -> torch.device:
    """The device a run trains on, with its CUDA policy applied (the project's defaults when
    ``policy`` is None): what the pipeline, ``find_ticket`` and every benchmark start from, so a
    timing measures the configuration the pipeline runs."""
    device = resolve_device(choice)
    (policy or CudaPolicy()).apply(device)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously), so a timing is true."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(run: Callable[[Any], object], short: Any, long: Any, steps: int, device: torch.device) -> float:
    """One step's wall-clock without a call's set-up: ``run(long)`` (an epoch of ``steps`` more
    batches than ``short``) less ``run(short)``, after one warm-up call, per step. What the
    stacked-versus-single probes compare (``stacked_training_ratio``, ``seed_rows_ratio``)."""

    def timed(data) -> float:
        synchronize(device)
        started = time.perf_counter()
        run(data)
        synchronize(device)
        return time.perf_counter() - started

    run(short)  # warm-up: allocations, the first kernels
    return max(timed(long) - timed(short), 1e-9) / max(steps, 1)


def describe_hardware(device: torch.device) -> str:
    """One line naming what a timing was measured on (goes next to every reported time)."""
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}; {CudaPolicy().describe()}), "
                f"torch {torch.__version__}")
    cpu = _cpu_model() or platform.processor() or platform.machine()
    # The kernel family (AVX512, AVX2, DEFAULT) is part of what a result depends on: float sums
    # round differently across them (docs/architecture.md, "What is bit-exact where").
    kernels = torch.backends.cpu.get_cpu_capability()
    return (f"CPU {cpu} ({kernels}), {torch.get_num_threads()} threads of {os.cpu_count()} cores, "
            f"torch {torch.__version__}")


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def stream_seed(seed: int, *parts: str | int) -> int:
    """A 63-bit seed for one random stream (model init, data order of an epoch, search noise...).

    Streams derived from one run seed are independent of each other and of the order in which they
    are used, so resuming at epoch ``e`` replays exactly the data order an uninterrupted run saw.
    """
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    return (zlib.crc32(key) << 31 ^ zlib.adler32(key)) & ((1 << 63) - 1)


def generator(device: torch.device | str, seed: int, *parts: str | int) -> torch.Generator:
    """A fresh generator on ``device`` seeded for one stream (see :func:`stream_seed`)."""
    return torch.Generator(device=torch.device(device)).manual_seed(stream_seed(seed, *parts))


class UniformNoise:
    """Fills buffers with fresh U(0, 1) draws from one seeded stream.

    On the CPU it uses numpy's PCG64, which fills the 266k floats of a LeNet-300-100 search step
    1.6x faster than torch's Mersenne Twister (the largest per-weight cost of that step). On CUDA it
    uses torch's generator. Both are deterministic for a given seed and stream.
    """

    def __init__(self, device: torch.device | str, seed: int, *parts: str | int, engine: str = "auto"):
        self.device = torch.device(device)
        self.engine = ("numpy" if self.device.type == "cpu" else "torch") if engine == "auto" else engine
        if self.engine == "numpy":
            if self.device.type != "cpu":
                raise ValueError("the numpy engine fills CPU tensors only")
            self._numpy = np.random.Generator(np.random.PCG64(stream_seed(seed, *parts)))
        elif self.engine == "torch":
            self._torch = generator(self.device, seed, *parts)
        else:
            raise ValueError(f"engine must be auto, numpy or torch, got {engine!r}")

    def fill_(self, out: torch.Tensor) -> torch.Tensor:
        if self.engine == "torch":
            return out.uniform_(generator=self._torch)
        if out.dtype == torch.float32 and out.is_contiguous():
            self._numpy.random(out=out.numpy(), dtype=np.float32)
            return out
        return out.copy_(torch.from_numpy(self._numpy.random(out.numel(), dtype=np.float32)).view_as(out))
