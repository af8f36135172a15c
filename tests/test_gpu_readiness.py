"""What a first GPU run needs, checked on a CPU with the GPU parts mocked (issue: "nothing
crashes, nothing silently falls back"): processes never share a GPU, the process group's backend
follows the run's device, and a bad combination is refused at run start in one line."""

from __future__ import annotations

import pytest
import torch
import yaml

from cts_pipeline.config import ConfigError, validate_run
from cts_pipeline.core import distributed

from .conftest import PROJECT_ROOT


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one CUDA device, as far as the checks can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def params(**runtime) -> dict:
    raw = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters.yml").read_text())
    raw["runtime"] = {**raw["runtime"], **runtime}
    return raw


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_more_processes_than_gpus_is_refused_at_run_start(one_gpu, device):
    with pytest.raises(ConfigError, match=r"runtime.distributed.nproc = 4 processes, one GPU each, but this "
                                          r"machine has 1"):
        validate_run(params(device=device, distributed={"nproc": 4}))


def test_one_named_gpu_for_several_processes_is_refused(one_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ConfigError, match=r"runtime.device = 'cuda:2' names one GPU, but runtime.distributed.nproc "
                                          r"= 2 processes each need their own"):
        validate_run(params(device="cuda:2", distributed={"nproc": 2}))
    validate_run(params(device="cuda", distributed={"nproc": 4}))  # one GPU each: fine


def test_the_backend_follows_the_run_device_not_the_machine(one_gpu):
    assert distributed.backend_for(torch.device("cpu")) == "gloo", "device: cpu on a GPU machine"
    assert distributed.backend_for(torch.device("cuda")) == "nccl"


def test_a_distributable_node_on_the_cpu_of_a_gpu_machine_asks_for_gloo(one_gpu, monkeypatch):
    from cts_pipeline.config import RuntimeConfig
    from cts_pipeline.pipelines import common

    asked = {}

    def fake_launch(fn, nproc, *args, backend=None, **kwargs):
        asked.update(nproc=nproc, backend=backend)
        return None, [], []

    monkeypatch.setattr(distributed, "launch", fake_launch)
    node = common.distributable(lambda runtime: "ran here")
    node(RuntimeConfig(device="cpu", distributed={"nproc": 2}, num_threads=2))
    assert asked == {"nproc": 2, "backend": "gloo"}


@pytest.mark.parametrize("local_rank", [0, 1])
def test_each_rank_takes_a_gpu_of_its_own_or_is_refused(one_gpu, local_rank):
    if local_rank == 0:
        assert distributed.own_gpu(0, "runtime.distributed.nproc") == 0
    else:  # the old rank % device_count() put this rank on GPU 0 beside rank 0: NCCL refuses that
        with pytest.raises(ValueError, match=r"runtime.distributed.nproc: process 1 needs a GPU of its own, but "
                                             r"this machine has 1"):
            distributed.own_gpu(1, "runtime.distributed.nproc")


def test_launching_more_nccl_processes_than_gpus_is_refused_before_any_start(one_gpu):
    with pytest.raises(ValueError, match="runtime.distributed.nproc = 2 processes, one GPU each, but this machine "
                                         "has 1"):
        distributed.launch(print, 2, backend="nccl")


@pytest.fixture
def cuda_flags(monkeypatch):
    """cuDNN and cuBLAS flags as they were, and an Ampere-or-later device as far as the policy can tell."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.benchmark) = saved[:3]
    torch.use_deterministic_algorithms(saved[3])


def test_the_cuda_policy_is_explicit_and_named_on_the_hardware_line(cuda_flags, monkeypatch):
    import os

    from cts_pipeline.config import RuntimeConfig
    from cts_pipeline.core.runtime import CudaPolicy, describe_hardware

    cuda = torch.device("cuda")
    RuntimeConfig().cuda_policy.apply(cuda)  # the defaults
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert "NVIDIA H200 (CUDA " in describe_hardware(cuda) and "TF32 on, cudnn.benchmark on)" in describe_hardware(cuda)

    CudaPolicy(tf32=False, deterministic=True).apply(cuda)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "TF32 off, cudnn.benchmark off, deterministic" in describe_hardware(cuda)


def test_before_ampere_tf32_stays_off_and_a_cpu_run_is_left_alone(cuda_flags, monkeypatch):
    from cts_pipeline.core.runtime import CudaPolicy

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    CudaPolicy(tf32=True).apply(torch.device("cuda"))
    assert not torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark = False
    CudaPolicy(deterministic=True).apply(torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark


def test_runtime_switches_are_checked_by_name():
    from cts_pipeline.config import RuntimeConfig

    with pytest.raises(ValueError, match="runtime.tf32 must be true or false, got 'yes'"):
        RuntimeConfig(tf32="yes")
