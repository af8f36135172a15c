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


# --- checkpoint interval (item 7: a 1.2 GB checkpoint every epoch stalls a GPU loop) -------------


def test_checkpoint_intervals_parse_and_bad_ones_are_named():
    from cts_pipeline.config import RuntimeConfig
    from cts_pipeline.core.checkpoints import parse_interval

    assert parse_interval(3) == ("epochs", 3.0) and parse_interval("auto") == ("auto", 0.05)
    assert parse_interval("90s") == ("seconds", 90.0) and parse_interval("1.5min") == ("seconds", 90.0)
    for bad in (0, True, "3", "10 hours", "-5s"):
        with pytest.raises(ValueError, match="runtime.checkpoint_every must be a number of epochs"):
            RuntimeConfig(checkpoint_every=bad)


def test_when_a_checkpoint_is_due(tmp_path):
    from cts_pipeline.core.checkpoints import Checkpoint

    every_two = Checkpoint(tmp_path / "a.pt", "k", every=2)
    assert [every_two.due(1.0) or every_two.save({}) is None and False for _ in range(5)] == [False] * 5
    assert every_two._save_seconds is not None  # it saved (after epochs 2 and 4)
    by_time = Checkpoint(tmp_path / "b.pt", "k", every="10s")
    assert [by_time.due(4.0) for _ in range(3)] == [False, False, True]
    auto = Checkpoint(tmp_path / "c.pt", "k", every="auto")
    assert auto.due(1.0), "the first checkpoint is always written: its cost is then known"
    auto.save({})
    auto._save_seconds = 1.0  # a 1 s save (a VGG-16 search's 1.2 GB): at most 5 % of 20 s of training
    assert [auto.due(4.0) for _ in range(5)] == [False, False, False, False, True]


@pytest.mark.parametrize("every, last_saved", [(2, 2), ("auto", 1)])
def test_a_run_stopped_between_checkpoints_resumes_from_the_last_one_to_the_bit(tmp_path, every, last_saved):
    """A run stopped after epoch 3 resumes from its last checkpoint (after epoch 2 when every 2
    epochs; after epoch 1 when auto finds a save of 0.15 s worth 3 epochs of 1 s) and ends exactly
    where an uninterrupted run ends (one process: bit equality holds)."""
    from cts_pipeline.core.checkpoints import Checkpoint
    from cts_pipeline.core.data import load_splits
    from cts_pipeline.core.models import build_model
    from cts_pipeline.core.training import TrainRecipe, train

    split = load_splits("digits")[0].subset(128)
    recipe = TrainRecipe(epochs=5, batch_size=32, lr=0.05, milestones=[4])

    def net():
        return build_model("convnet", image_shape=(1, 8, 8), num_classes=10, width=4,
                           generator=torch.Generator().manual_seed(0))

    reference = net()
    train(reference, split, None, recipe, seed=1, stage="t", progress=False)

    class Stop(Exception):
        pass

    def stop_after_three(done, _model):
        if done == 3:
            raise Stop

    checkpoint = Checkpoint(tmp_path / "t.pt", "k", every=every)
    if every == "auto":  # epochs here take milliseconds: time them as 1 s, and the save as 0.15 s
        checkpoint.due = _timed_as(checkpoint, epoch=1.0, save=0.15)
    with pytest.raises(Stop):
        train(net(), split, None, recipe, seed=1, stage="t", checkpoint=checkpoint, on_epoch_end=stop_after_three,
              progress=False)
    assert torch.load(tmp_path / "t.pt", weights_only=True)["epochs_done"] == last_saved
    resumed = net()
    result = train(resumed, split, None, recipe, seed=1, stage="t", checkpoint=Checkpoint(tmp_path / "t.pt", "k"),
                   progress=False)
    assert result.resumed_at == last_saved
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _timed_as(checkpoint, *, epoch: float, save: float):
    """``auto``'s own rule, with every epoch taking ``epoch`` seconds and every save ``save``."""
    real = type(checkpoint).due

    def due(epoch_seconds):
        if checkpoint._save_seconds is not None:
            checkpoint._save_seconds = save
        return real(checkpoint, epoch)

    return due


# --- precision (items 4 and 5) ------------------------------------------------------------------


def test_fp16_steps_never_wait_for_the_host(monkeypatch):
    """Under fp16 the SGD is fused, so GradScaler.step passes its found-inf flag on the device
    instead of calling .item() (item 4: a host sync every step). Run here with the CPU's scaler."""
    from cts_pipeline.core.training import TrainRecipe, optimizer_and_scaler

    recipe = TrainRecipe(epochs=1, batch_size=8, lr=0.1, precision="fp16", grad_clip_norm=2.0)
    weights = [torch.nn.Parameter(torch.randn(5))]
    optimizer, scaler = optimizer_and_scaler(weights, recipe, 0.1, "fp16", torch.device("cpu"))
    assert optimizer.defaults["fused"] is True and scaler is not None
    plain, no_scaler = optimizer_and_scaler(weights, recipe, 0.1, "fp32", torch.device("cpu"))
    assert not plain.defaults["fused"] and no_scaler is None
    syncs = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: syncs.append(1) or real_item(self))
    for _ in range(3):  # the trainer's order: scale, backward, unscale, clip, step, update
        scaler.scale((weights[0] ** 2).sum()).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(weights, 2.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert syncs == []


@pytest.mark.cross_path
def test_stacked_retraining_under_bf16_matches_one_at_a_time(monkeypatch):
    """Item 5: stacked retraining takes bf16 (only fp16's shared scaler stops it). Autocast to bf16
    runs on the CPU too; the trainer's CUDA-only guard is lifted for the test."""
    import cts_pipeline.core.batched_training as batched
    import cts_pipeline.core.training as training
    from cts_pipeline.core.data import load_splits
    from cts_pipeline.core.masks import global_topk_mask, prunable_parameters
    from cts_pipeline.core.models import build_model

    monkeypatch.setattr(training, "_effective_precision", lambda precision, device: precision)
    monkeypatch.setattr(batched, "_effective_precision", lambda precision, device: precision)
    train_split, test_split = (s.subset(n) for s, n in zip(load_splits("digits"), (256, 128), strict=True))
    recipe = training.TrainRecipe(epochs=2, batch_size=64, lr=0.05, precision="bf16")

    def net():
        return build_model("convnet", image_shape=(1, 8, 8), num_classes=10, width=4,
                           generator=torch.Generator().manual_seed(0))

    model = net()
    assert batched.supports(model, recipe, torch.device("cpu"))
    masks = [global_topk_mask({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
                               for n, p in prunable_parameters(model).items()}, k) for i, k in enumerate((0.5, 0.2))]
    states, results = batched.train_tickets(model, masks, train_split, test_split, recipe, seed=0, stage="stacked",
                                            progress=False)
    for mask, state, result in zip(masks, states, results, strict=True):
        one = net()
        single = training.train(one, train_split, test_split, recipe, seed=0, stage="one", mask=mask, progress=False)
        for name, value in one.state_dict().items():
            if value.is_floating_point():  # bf16 matmuls in another order: agreement to bf16's precision
                assert torch.allclose(state[name], value, rtol=5e-2, atol=5e-3), name
        assert result.final["train_loss"] == pytest.approx(single.final["train_loss"], rel=2e-2)
        assert all(bool((state[n][mask[n] == 0] == 0).all()) for n in mask)
