"""What a first GPU run needs, checked on a CPU with the GPU parts mocked (issue: "nothing
crashes, nothing silently falls back"): processes never share a GPU, the process group's backend
follows the run's device, and a bad combination is refused at run start in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from cts_pipeline.config.typed import ConfigError
from cts_pipeline.config.validate import validate_run
from cts_pipeline.core.device import distributed

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
    from cts_pipeline.config.sections import RuntimeConfig
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
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
     torch.backends.cudnn.benchmark) = saved[:3]
    torch.use_deterministic_algorithms(saved[3])


def test_the_cuda_policy_is_explicit_and_named_on_the_hardware_line(cuda_flags, monkeypatch):
    import os

    from cts_pipeline.config.sections import RuntimeConfig
    from cts_pipeline.core.device.runtime import CudaPolicy, describe_hardware, tf32_modes

    cuda = torch.device("cuda")
    RuntimeConfig().cuda_policy.apply(cuda)  # the defaults
    assert tf32_modes() == (True, True)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert "NVIDIA H200 (CUDA " in describe_hardware(cuda) and "TF32 matmul on, TF32 conv on, cudnn.benchmark on)" in describe_hardware(cuda)

    CudaPolicy(tf32=False, deterministic=True).apply(cuda)
    assert tf32_modes() == (False, False) and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "TF32 matmul off, TF32 conv off, cudnn.benchmark off, deterministic" in describe_hardware(cuda)


def test_before_ampere_tf32_stays_off_and_a_cpu_run_is_left_alone(cuda_flags, monkeypatch):
    from cts_pipeline.core.device.runtime import CudaPolicy, tf32_modes

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    CudaPolicy(tf32=True).apply(torch.device("cuda"))
    assert tf32_modes() == (False, False)
    torch.backends.cudnn.benchmark = False
    CudaPolicy(deterministic=True).apply(torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark


def test_runtime_switches_are_checked_by_name():
    from cts_pipeline.config.sections import RuntimeConfig

    with pytest.raises(ValueError, match="runtime.tf32 must be true or false, got 'yes'"):
        RuntimeConfig(tf32="yes")


# --- checkpoint interval (item 7: a 1.2 GB checkpoint every epoch stalls a GPU loop) -------------


def test_checkpoint_intervals_parse_and_bad_ones_are_named():
    from cts_pipeline.config.sections import RuntimeConfig
    from cts_pipeline.core.artifacts.checkpoints import parse_interval

    assert parse_interval(3) == ("epochs", 3.0) and parse_interval("auto") == ("auto", 0.05)
    assert parse_interval("90s") == ("seconds", 90.0) and parse_interval("1.5min") == ("seconds", 90.0)
    for bad in (0, True, "3", "10 hours", "-5s"):
        with pytest.raises(ValueError, match="runtime.checkpoint_every must be a number of epochs"):
            RuntimeConfig(checkpoint_every=bad)


def test_when_a_checkpoint_is_due(tmp_path):
    from cts_pipeline.core.artifacts.checkpoints import Checkpoint

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


@pytest.mark.parametrize("every, last_saved, background", [(2, 2, False), ("auto", 1, False), (2, 2, True)])
def test_a_run_stopped_between_checkpoints_resumes_from_the_last_one_to_the_bit(tmp_path, every, last_saved,
                                                                                  background):
    """A run stopped after epoch 3 resumes from its last checkpoint (after epoch 2 when every 2
    epochs; after epoch 1 when auto finds a save of 0.15 s worth 3 epochs of 1 s) and ends exactly
    where an uninterrupted run ends (one process: bit equality holds)."""
    from cts_pipeline.core.artifacts.checkpoints import Checkpoint
    from cts_pipeline.core.data.splits import load_splits
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.core.train.loop import train
    from cts_pipeline.core.train.recipe import TrainRecipe

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

    checkpoint = Checkpoint(tmp_path / "t.pt", "k", every=every, background=background)
    if every == "auto":  # epochs here take milliseconds: time them as 1 s, and the save as 0.15 s
        checkpoint.due = _timed_as(checkpoint, epoch=1.0, save=0.15)
    with pytest.raises(Stop):
        train(net(), split, None, recipe, seed=1, stage="t", checkpoint=checkpoint, on_epoch_end=stop_after_three,
              progress=False)
    checkpoint.wait()  # a background write lands whole even when the loop has stopped
    assert torch.load(tmp_path / "t.pt", weights_only=True)["epochs_done"] == last_saved
    resumed = net()
    result = train(resumed, split, None, recipe, seed=1, stage="t", checkpoint=Checkpoint(tmp_path / "t.pt", "k"),
                   progress=False)
    assert result.resumed_at == last_saved
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_background_checkpoint_writes_the_state_as_it_was_and_reports_a_failed_write(tmp_path, monkeypatch):
    """Item 7: with ``background`` (a GPU run's checkpoints) the loop waits only for a copy of the
    state; what lands is that copy, whatever the loop does next, and a write that fails is raised
    by the next save or by finish, not lost."""
    import errno

    from cts_pipeline.core.artifacts.checkpoints import Checkpoint
    from cts_pipeline.pipelines import common

    weights = torch.zeros(1000)
    checkpoint = Checkpoint(tmp_path / "s.pt", "k", background=True)
    checkpoint.save({"epochs_done": 1, "weights": weights, "nested": {"moments": [weights]}})
    weights.add_(1.0)  # the next epoch, while the file is written
    checkpoint.wait()
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    assert saved["epochs_done"] == 1 and not saved["weights"].any() and not saved["nested"]["moments"][0].any()

    def full_disk(state):
        raise OSError(errno.ENOSPC, "no space left on the device holding the checkpoint")

    monkeypatch.setattr(checkpoint, "_write", full_disk)
    checkpoint.save({"epochs_done": 2})
    with pytest.raises(OSError, match="no space left"):
        checkpoint.finish()
    assert torch.load(tmp_path / "s.pt", weights_only=True)["epochs_done"] == 1, "the previous one is kept"

    from cts_pipeline.config.sections import RuntimeConfig

    runtime = RuntimeConfig(device="cpu", checkpoint_dir=str(tmp_path))
    assert not common.checkpoint_for(runtime, "ns", "train", "key").background
    monkeypatch.setattr(common, "resolve_device", lambda choice: torch.device("cuda"))
    assert common.checkpoint_for(runtime, "ns", "train", "key").background


def _timed_as(checkpoint, *, epoch: float, save: float):
    """``auto``'s own rule, with every epoch taking ``epoch`` seconds and every save ``save``."""
    real = type(checkpoint).due

    def due(epoch_seconds):
        if checkpoint._save_seconds is not None:
            checkpoint._save_seconds = save
        return real(checkpoint, epoch)

    return due


# --- precision (items 4 and 5) ------------------------------------------------------------------


def test_fp16_steps_never_wait_for_the_host(monkeypatch, digits_payloads):
    """Under fp16 the SGD is fused, so GradScaler.step passes its found-inf flag on the device
    instead of calling .item() (item 4: a host sync every step). Through ``train()`` itself, with
    the CPU's scaler: the host reads (``.item()``, ``bool()`` of a tensor) of an epoch of 2 steps
    and of one of 8 are the same few, at the epoch's end; a read per step would add 6."""
    import cts_pipeline.core.train.loop as training
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.core.train.recipe import TrainRecipe
    from cts_pipeline.pipelines.common import split_from_payload

    optimizer, scaler = training.optimizer_and_scaler([torch.nn.Parameter(torch.randn(5))],
                                                      TrainRecipe(epochs=1, batch_size=8, lr=0.1, precision="fp16"),
                                                      0.1, "fp16", torch.device("cpu"))
    assert optimizer.defaults["fused"] is True and scaler is not None
    monkeypatch.setattr(training, "effective_precision", lambda precision, device: precision)
    split = split_from_payload(digits_payloads[0], torch.device("cpu"), None)
    real_item, real_bool = torch.Tensor.item, torch.Tensor.__bool__

    def host_reads(steps: int) -> int:
        model = build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10,
                            generator=torch.Generator().manual_seed(0))
        recipe = TrainRecipe(epochs=1, batch_size=128 // steps, lr=0.05, precision="fp16", grad_clip_norm=2.0)
        reads = []
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "item", lambda self: reads.append("item") or real_item(self))
            patch.setattr(torch.Tensor, "__bool__", lambda self: reads.append("bool") or real_bool(self))
            training.train(model, split, None, recipe, seed=0, stage="fp16", progress=False)
        return len(reads)

    assert host_reads(8) == host_reads(2)


def test_fp16_training_whose_first_steps_overflow_matches_plain_sgd(monkeypatch):
    """torch's fused SGD makes its momentum buffers with empty_like and fills them in its kernel,
    which a step skipped for an overflow never runs: with GradScaler's first steps overflowing (as
    they often do at its initial scale of 2^16), the next steps read uninitialised memory (here the
    weights became inf and the run stopped on a NaN loss). Zero buffers made up front give what
    unfused SGD gives."""
    import cts_pipeline.core.train.loop as training
    from cts_pipeline.core.data.splits import load_splits
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.core.train.recipe import TrainRecipe

    monkeypatch.setattr(training, "effective_precision", lambda precision, device: precision)
    split = load_splits("digits")[0].subset(256)
    # Summed losses make gradients 64 times larger: scaled by 2^16 they overflow fp16 at first.
    recipe = TrainRecipe(epochs=2, batch_size=64, lr=0.05 / 64, precision="fp16", grad_clip_norm=5.0,
                         loss_reduction="sum")
    scales = []
    real_update = torch.amp.GradScaler.update
    monkeypatch.setattr(torch.amp.GradScaler, "update",
                        lambda self, *a: (real_update(self, *a), scales.append(self.get_scale()))[0])

    def trained(fused: bool) -> dict:
        real = training.optimizer_and_scaler

        def chosen(params, recipe, lr, precision, device):
            optimizer, scaler = real(params, recipe, lr, precision, device)
            if not fused:  # plain SGD: the scaler skips its step on the host's reading of found-inf
                optimizer = torch.optim.SGD(params, lr=lr, momentum=recipe.momentum,
                                            weight_decay=recipe.weight_decay)
            return optimizer, scaler

        monkeypatch.setattr(training, "optimizer_and_scaler", chosen)
        model = build_model("convnet", image_shape=(1, 8, 8), num_classes=10, width=4,
                            generator=torch.Generator().manual_seed(0))
        training.train(model, split, None, recipe, seed=0, stage="fp16", progress=False)
        return model.state_dict()

    fused = trained(True)
    assert scales[0] < 2.0**16, "the first step overflowed and was skipped"
    plain = trained(False)
    for name, value in plain.items():
        if value.is_floating_point():
            torch.testing.assert_close(fused[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.cross_path
@pytest.mark.parametrize(("precision", "rtol", "atol", "loss_rel", "overflow"), [
    ("bf16", 5e-2, 5e-3, 2e-2, False), ("fp16", 1e-2, 1e-3, 1e-2, False), ("fp16", 5e-2, 5e-3, 1e-2, True)],
    ids=["bf16", "fp16", "fp16 overflowing"])
def test_stacked_retraining_under_half_precision_matches_one_at_a_time(monkeypatch, precision, rtol, atol, loss_rel,
                                                                      overflow):
    """Item 5: stacked retraining takes bf16, and fp16 with one loss scale per ticket. Autocast
    and GradScaler run on the CPU too; the trainer's CUDA-only guard is lifted for the test. The
    matmuls sum in another order: agreement to the half type's precision."""
    import cts_pipeline.core.train.batched as batched
    import cts_pipeline.core.train.loop as training
    from cts_pipeline.core.data.splits import load_splits
    from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.core.train.recipe import TrainRecipe

    monkeypatch.setattr(training, "effective_precision", lambda precision, device: precision)
    monkeypatch.setattr(batched, "effective_precision", lambda precision, device: precision)
    train_split, test_split = (s.subset(n) for s, n in zip(load_splits("digits"), (256, 128), strict=True))
    recipe = TrainRecipe(epochs=2, batch_size=64, lr=0.05, precision=precision, grad_clip_norm=5.0)
    skipped = []
    if overflow:  # summed losses: gradients 64 times larger, so the first scaled steps overflow fp16
        recipe = dataclasses.replace(recipe, loss_reduction="sum", lr=0.05 / 64)

        class WatchedRowScaler(batched.RowScaler):
            def update(self, finite):
                skipped.append((~finite).tolist())
                return super().update(finite)

        monkeypatch.setattr(batched, "RowScaler", WatchedRowScaler)

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
            if value.is_floating_point():
                assert torch.allclose(state[name], value, rtol=rtol, atol=atol), name
        assert result.final["train_loss"] == pytest.approx(single.final["train_loss"], rel=loss_rel)
        assert all(bool((state[n][mask[n] == 0] == 0).all()) for n in mask)
    if overflow:
        assert any(any(rows) for rows in skipped) and not any(skipped[-1]), "tickets skipped steps, then stepped"


def test_the_row_scaler_is_one_grad_scaler_per_ticket(monkeypatch):
    """K stacked tickets under fp16, one of them overflowing: each row steps (or skips), scales and
    grows exactly as its own torch.amp.GradScaler would, with its own SGD with momentum, and never
    reads a value back to the host (no .item(), no bool() of a tensor)."""
    from cts_pipeline.core.train.batched import RowScaler

    torch.manual_seed(0)
    start = torch.randn(3, 4)
    grads_per_step = [torch.randn(3, 4) for _ in range(5)]
    grads_per_step[1][1, 2] = float("inf")  # ticket 1 overflows at the second step
    grads_per_step[3][0, 0] = float("nan")  # ticket 0 at the fourth
    grads_per_step[0][2, 1] = float("inf")  # ticket 2 at the first: its momentum buffer not yet made

    stacked = start.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([stacked], lr=0.1, momentum=0.9, weight_decay=1e-3)
    scaler = RowScaler(3, torch.device("cpu"), init_scale=8.0, growth_interval=2)
    rows = [start[k].clone().requires_grad_(True) for k in range(3)]
    optimizers = [torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-3) for w in rows]
    scalers = [torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=2) for _ in rows]
    syncs = []
    for grads in grads_per_step:
        optimizer.zero_grad()
        (scaler.scaled(torch.ones(3)) * (stacked * grads).sum(1)).sum().backward()
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "item", lambda self: syncs.append("item"))
            patch.setattr(torch.Tensor, "__bool__", lambda self: syncs.append("bool") or True)
            finite = scaler.unscale_([stacked])
            scaler.step(optimizer, [stacked], finite)
            scaler.update(finite)
        for k in range(3):
            optimizers[k].zero_grad()
            scalers[k].scale((rows[k] * grads[k]).sum()).backward()
            scalers[k].step(optimizers[k])
            scalers[k].update()
    for k in range(3):
        assert torch.allclose(stacked[k], rows[k], atol=1e-6), k
        assert scaler.scale[k].item() == scalers[k].get_scale(), k
        assert torch.allclose(optimizer.state[stacked]["momentum_buffer"][k],
                              optimizers[k].state[rows[k]]["momentum_buffer"], atol=1e-6), k
    assert [s.get_scale() for s in scalers] != [8.0] * 3  # the steps skipped and grew in between
    assert syncs == []


def test_auto_precision_is_bf16_where_the_gpu_has_it_and_fp32_elsewhere(monkeypatch, caplog):
    """The default ``training.precision: auto``: bf16 autocast (no scaler, so no host sync) on a
    GPU with native bf16, fp32 on older GPUs and, without a word, on the CPU."""
    import logging

    from cts_pipeline.core.train.loop import effective_precision
    from cts_pipeline.core.train.recipe import TrainRecipe

    assert TrainRecipe(epochs=1, batch_size=8, lr=0.1).precision == "auto"
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert effective_precision("auto", cuda) == "bf16"
    assert effective_precision("fp16", cuda) == "fp16"  # asked for (the authors' presets): kept
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert effective_precision("auto", cuda) == "fp32"
    with caplog.at_level(logging.WARNING, logger="cts_pipeline"):
        assert effective_precision("auto", torch.device("cpu")) == "fp32"
    assert not caplog.records


# --- memory (item 2: a ResNet-50 search at batch 1024 saves about 82 GiB of activations) -----------


def _lenet_search(density, seed=0):
    """A LeNet (no BatchNorm: micro-batches give exactly the batch's gradient) and its relaxation."""
    from cts_pipeline.core.cts import ConcreteMask
    from cts_pipeline.core.nets.masks import prunable_parameters
    from cts_pipeline.core.nets.registry import build_model

    model = build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10,
                        generator=torch.Generator().manual_seed(seed))
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=generator), torch.randint(0, 10, (64,), generator=generator)
    return model, ConcreteMask(prunable_parameters(model), density), x, y


@pytest.mark.parametrize("density", [0.05, [0.05, 0.2]], ids=["one density", "two rows"])
@pytest.mark.parametrize("objective", ["kl", "ce"])
def test_micro_batches_give_the_whole_batch_gradient(density, objective):
    """The search's gradient over 64 samples in 5 uneven micro-batches is the one-batch gradient,
    and so is the objective: each piece's mean is weighted by its share of the samples."""
    from cts_pipeline.core.cts import OBJECTIVES
    from cts_pipeline.core.cts.search import _objective_and_gradient
    from cts_pipeline.core.device.runtime import UniformNoise
    from cts_pipeline.core.train.memory import MicroBatches

    model, relaxation, x, y = _lenet_search(density)

    def run(micro):
        noise = UniformNoise("cpu", 0, "concrete-noise", 0)
        return _objective_and_gradient(model, relaxation, OBJECTIVES[objective], noise, x, y, 100.0, micro)

    whole_loss, whole_grad = run(None)
    loss, grad = run(MicroBatches(5, limit=32, stage="test"))
    assert grad.shape == relaxation.logits.shape
    torch.testing.assert_close(loss, whole_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-4, atol=1e-5 * float(whole_grad.abs().max()))


def test_an_out_of_memory_step_repeats_in_more_pieces_with_the_same_noise(monkeypatch, caplog):
    """A step that runs out of device memory doubles its micro-batches and runs again, with one
    warning; the noise was drawn before, so the step is the one an unfailed step would have taken."""
    import logging

    from cts_pipeline.core.cts import OBJECTIVES, GradBalance, search
    from cts_pipeline.core.device.runtime import UniformNoise
    from cts_pipeline.core.train.memory import MicroBatches

    def step(micro):
        model, relaxation, x, y = _lenet_search(0.05)
        optimizer = torch.optim.Adam([relaxation.logits], lr=0.1)
        balancer = GradBalance(0.05, relaxation.num_weights)
        search.search_step(model, relaxation, OBJECTIVES["kl"], balancer, optimizer,
                           UniformNoise("cpu", 0, "concrete-noise", 0), x, y, 100.0, micro_batches=micro)
        return relaxation.logits.detach()

    plain = step(None)
    real = search._objective
    pieces_seen = []

    def small_device(model, relaxation, objective, soft, x, y):
        pieces_seen.append(x.shape[0])
        if x.shape[0] > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 82.00 GiB")
        return real(model, relaxation, objective, soft, x, y)

    monkeypatch.setattr(search, "_objective", small_device)
    micro = MicroBatches(1, limit=32, stage="cts search")
    with caplog.at_level(logging.WARNING, logger="cts_pipeline"):
        fell_back = step(micro)
    assert micro.count == 4 and pieces_seen == [64, 32, 16, 16, 16, 16]
    [warning] = [r.getMessage() for r in caplog.records]
    assert "cts search: out of device memory; each batch now runs as 2 micro-batches" in warning
    # After one Adam step (about lr · sign(g) where |g| passes Adam's eps): float rounding only.
    torch.testing.assert_close(fell_back, plain, rtol=1e-4, atol=1e-4)

    with pytest.raises(torch.OutOfMemoryError):  # past the limit the error stands
        MicroBatches(1, limit=1, stage="x").run(lambda count: small_device(None, None, None, None,
                                                                           torch.zeros(64), None))


def test_objectives_that_are_not_batch_means_run_whole():
    from cts_pipeline.core.cts import OBJECTIVES
    from cts_pipeline.core.cts.search import _gradient_to_mask, _micro_batches

    model, relaxation, x, y = _lenet_search(0.05)
    assert _micro_batches(model, relaxation, OBJECTIVES["dloss"], x, y, 1.0, 64, 0, "s").limit == 1
    assert _micro_batches(model, relaxation, OBJECTIVES["kl"], x, y, 1.0, 16, 0, "s").limit == 8  # 16 per rank
    soft = torch.sigmoid(relaxation.logits.detach()).requires_grad_(True)
    with pytest.raises(ValueError, match="loss_ratio objective is not a mean over samples"):
        _gradient_to_mask(model, relaxation, OBJECTIVES["dloss"], soft, x, y, 1.0, 2)


def test_the_plan_fits_a_share_of_the_free_memory(monkeypatch):
    """Measured at 8 samples, scaled to the batch, cut to fit 80 % of the free memory; never below
    two samples a piece (BatchNorm); a CPU plans nothing."""
    from cts_pipeline.core.train import memory

    assert memory.micro_batches_to_fit(2**20, 1024, 400 * 2**20) == 4  # 1 GiB over 320 MiB
    assert memory.micro_batches_to_fit(2**20, 1024, 2**40) == 1
    assert memory.micro_batches_to_fit(2**30, 64, 2**20) == 32  # at most 2 samples a piece
    probed = []
    monkeypatch.setattr(memory, "free_bytes", lambda device: 100 * 2**20)
    monkeypatch.setattr(memory, "peak_bytes", lambda device, step: (step(), 8 * 2**20)[1])
    assert memory.plan_micro_batches(torch.device("cuda"), 512, probed.append, "s") == 7  # 512 MiB / 80 MiB
    assert probed == [8]

    def no_room(samples):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(memory, "release_cached_memory", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert memory.plan_micro_batches(torch.device("cuda"), 512, no_room, "s") == 256
    monkeypatch.undo()
    assert memory.plan_micro_batches(torch.device("cpu"), 512, probed.append, "s") == 1 and probed == [8]


def test_a_search_planned_in_micro_batches_finds_the_same_logits_and_says_so(monkeypatch):
    """Through the whole loop: a plan of 4 micro-batches (as a small GPU would make) gives the
    logits of the whole-batch search, and the result records it with the path its rows took."""
    from cts_pipeline.core.cts import SearchConfig, concrete_search, search
    from cts_pipeline.core.data.splits import load_splits
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.core.train.recipe import TrainRecipe

    train_split = load_splits("digits")[0].subset(128)
    recipe = TrainRecipe(epochs=2, batch_size=64, lr=0.1)

    def run(density):
        model = build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10,
                            generator=torch.Generator().manual_seed(0))
        return concrete_search(model, train_split, density=density, config=SearchConfig(objective="kl"),
                               recipe=recipe, seed=0, progress=False)

    whole = run([0.05, 0.2])
    monkeypatch.setattr(search, "plan_micro_batches", lambda device, batch, probe, stage, **options: 4)
    pieces = run([0.05, 0.2])
    for a, b in zip(whole, pieces, strict=True):
        assert (a.micro_batches, b.micro_batches) == (1, 4) and a.forward_path == b.forward_path == "stacked"
        for name in a.scores:
            torch.testing.assert_close(b.scores[name], a.scores[name], rtol=1e-4, atol=1e-4)
    assert run(0.05).forward_path == "single"


@pytest.mark.parametrize("model_name", ["convnet", "lenet_300_100"])
def test_micro_batches_on_a_batchnorm_model_are_warned_about_and_recorded(monkeypatch, caplog, model_name):
    """On a model with BatchNorm (the search normalises with batch statistics) pieces of a batch
    are normalised apart, so the gradient is not the whole batch's: measured here, then said in a
    WARNING that names the effect, and recorded in the result (search_micro_batches in the tables).
    On LeNet (no BatchNorm) the gradient is the batch's and the plan stays an INFO line."""
    import logging

    from cts_pipeline.core.cts import (
        OBJECTIVES,
        ConcreteMask,
        SearchConfig,
        batch_statistics,
        concrete_search,
    )
    from cts_pipeline.core.cts.search import _objective_and_gradient
    from cts_pipeline.core.data.splits import load_splits
    from cts_pipeline.core.device.runtime import UniformNoise
    from cts_pipeline.core.nets.masks import prunable_parameters
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.core.train import memory
    from cts_pipeline.core.train.memory import MicroBatches
    from cts_pipeline.core.train.recipe import TrainRecipe

    def model():
        return build_model(model_name, image_shape=(1, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(0),
                           **({"width": 4} if model_name == "convnet" else {}))

    net = model()
    for p in net.parameters():
        p.requires_grad_(False)
    relaxation = ConcreteMask(prunable_parameters(net), 0.05)
    x, y = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 10

    def gradient(micro):
        with batch_statistics(net):
            return _objective_and_gradient(net, relaxation, OBJECTIVES["kl"], UniformNoise("cpu", 0, "n", 0), x, y,
                                           100.0, micro)[1]

    whole, pieces = gradient(None), gradient(MicroBatches(4, limit=32, stage="t"))
    apart = float((pieces - whole).norm() / whole.norm())
    assert (apart > 1e-3) if model_name == "convnet" else (apart < 1e-5), apart

    monkeypatch.setattr(memory, "free_bytes", lambda device: 100)
    monkeypatch.setattr(memory, "peak_bytes", lambda device, step: 8 * 5)  # 5 bytes a sample, 80 % of 100 free: 16
    with caplog.at_level(logging.INFO, logger="cts_pipeline"):
        found = concrete_search(model(), load_splits("digits")[0].subset(128), density=0.05,
                                config=SearchConfig(epochs=1), recipe=TrainRecipe(epochs=1, batch_size=64, lr=0.1),
                                seed=0, stage="bn search", progress=False)
    assert found.micro_batches == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if model_name == "convnet":
        [warning] = warnings
        assert warning.startswith("bn search: 4 micro-batches of a 64-sample batch (a recipe rank's chunk) on a "
                                  "model with BatchNorm: each micro-batch is normalised with its own statistics")
    else:
        assert not warnings
        assert any("each batch runs as 4 micro-batches" in r.getMessage() for r in caplog.records)


# --- the stacked-versus-vmap check (item 3: TF32 would send every batched search to vmap) -------


def test_the_stacked_check_compares_in_float64_and_gives_the_model_back(monkeypatch):
    """Item 3: in float32 the two forwards differ by rounding beyond any fixed tolerance (TF32 on a
    GPU; ResNet-50 with batch statistics over two images on a CPU, 2e-5), so the check runs both in
    float64 on a few samples, and the model returns to float32 afterwards."""
    from cts_pipeline.core.cts import ConcreteMask, forwards
    from cts_pipeline.core.nets.masks import prunable_parameters
    from cts_pipeline.core.nets.registry import build_model

    model = build_model("resnet50", image_shape=(3, 32, 32), num_classes=10, bn_running_stats=False,
                        generator=torch.Generator().manual_seed(0))
    for p in model.parameters():
        p.requires_grad_(False)
    relaxation = ConcreteMask(prunable_parameters(model), [0.1, 0.01])
    seen = []
    real = forwards.masked_forward

    def spy(model, relaxation, soft, x):
        seen.append((x.dtype, x.shape[0], next(model.parameters()).dtype))
        return real(model, relaxation, soft, x)

    monkeypatch.setattr(forwards, "masked_forward", spy)
    with forwards.batch_statistics(model):
        assert forwards.check_stacked(model, relaxation, torch.randn(2, 3, 32, 32), "s")
        assert forwards.check_stacked(model, relaxation, torch.randn(64, 3, 32, 32), "s")
    assert seen[:2] == [(torch.float64, 2, torch.float64)] * 2
    assert seen[2][1] == forwards.CHECK_SAMPLES, "a few samples: no memory to plan for"
    assert all(p.dtype == torch.float32 for p in model.parameters()) and relaxation.logits.dtype == torch.float32


# --- whatever runs out of memory, the run goes on one row at a time -----------------------------


@pytest.fixture
def digits_payloads():
    from cts_pipeline.config.sections import DataConfig, ModelConfig, RuntimeConfig
    from cts_pipeline.pipelines.common import build_network, split_from_payload
    from cts_pipeline.pipelines.data_processing.nodes import prepare_data

    train, test = prepare_data(DataConfig(name="digits", train_subset=128, test_subset=64))
    model = ModelConfig(name="lenet_300_100")
    runtime = RuntimeConfig(device="cpu", progress=False, checkpoint_dir=None)
    net = build_network(model, split_from_payload(train, torch.device("cpu"), None), torch.device("cpu"), seed=0)
    return train, test, model, runtime, {k: v.clone() for k, v in net.state_dict().items()}


def test_a_batched_search_that_does_not_fit_runs_one_density_at_a_time(digits_payloads, monkeypatch, caplog):
    import logging

    from cts_pipeline.config.sweep import Branch
    from cts_pipeline.core.train.recipe import TrainRecipe
    from cts_pipeline.pipelines.cts import nodes

    train, _test, model, runtime, theta = digits_payloads
    real = nodes.concrete_search

    def rows_do_not_fit(*args, density, **kwargs):
        if not isinstance(density, float):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args, density=density, **kwargs)

    monkeypatch.setattr(nodes, "concrete_search", rows_do_not_fit)
    monkeypatch.setattr(nodes, "release_cached_memory", lambda: None)
    group = [Branch("cts_kl", 0, s, family="cts", settings={"objective": "kl", "epochs": 1}) for s in (0.9, 0.95)]
    with caplog.at_level(logging.WARNING, logger="cts_pipeline"):
        out = nodes.search_masks(train, model, TrainRecipe(epochs=2, batch_size=64, lr=0.1), runtime, theta, *group)
    assert "2 densities searched together do not fit in device memory; searching them one at a time" in caplog.text
    assert [out[f"{b.namespace}.mask_log"]["search_path"] for b in group] == ["single", "single"]


def test_stacked_retraining_trains_as_many_tickets_at_once_as_fit(digits_payloads, monkeypatch, caplog):
    """A device whose free memory holds two tickets' steps: the three tickets retrain as a stacked
    pair and then one alone, and each log says how it ran. The plan reads one ticket's probe steps
    at 4 and 8 samples (weights 30 MiB, activations 1 MiB a sample: 94 MiB a ticket at batch 64),
    and its evaluation at 8 (10 KiB a sample: about 40 MiB a ticket at the evaluation batch of 1000)."""
    import logging

    from cts_pipeline.config.sweep import Branch
    from cts_pipeline.core.train import memory
    from cts_pipeline.core.train.recipe import TrainRecipe
    from cts_pipeline.pipelines.cts import nodes as cts_nodes
    from cts_pipeline.pipelines.tickets import nodes

    train, test, model, runtime, theta = digits_payloads
    runtime = runtime.replace(batch_sparsities=True)
    recipe = TrainRecipe(epochs=1, batch_size=64, lr=0.1)
    group = [Branch("cts_kl", 0, s, family="cts", settings={"objective": "kl", "epochs": 1}) for s in (0.8, 0.9, 0.95)]
    searched = cts_nodes.search_masks(train, model, recipe, runtime, theta, *group)
    payloads = [nodes.topk_mask(searched[f"{b.namespace}.scores"], b) for b in group]
    probed = []
    mib = 2**20

    def fake_peak(device, step):  # training at 4 and 8 samples, then one evaluation of 8 (80 KiB)
        step()
        probed.append(len(probed))
        return {1: 34 * mib, 2: 38 * mib, 3: 80 * 2**10}[len(probed)]

    monkeypatch.setattr(memory, "free_bytes", lambda device: 240 * mib)  # 0.8 × 240 = 192 MiB: two tickets
    monkeypatch.setattr(memory, "peak_bytes", fake_peak)
    with caplog.at_level(logging.INFO, logger="cts_pipeline"):
        out = nodes.retrain_tickets(train, test, model, recipe, runtime, theta, *payloads, *group)
    assert len(probed) == 3
    assert "the 3 rows run in groups of 2" in caplog.text
    logs = [out[f"{b.namespace}.retrain_log"] for b in group]
    assert [log.get("retrain_path", "single") for log in logs] == ["stacked x2", "stacked x2", "single"]
    assert memory.rows_to_fit(30 * mib, mib, 64, 240 * mib) == 2
    monkeypatch.undo()
    assert memory.plan_rows(torch.device("cpu"), 3, 64, lambda n: None, "s") == 3  # nothing to plan on a CPU


def test_a_stacked_group_out_of_memory_frees_its_tensors_before_the_fallback(digits_payloads, monkeypatch):
    """The one-at-a-time retraining after a stacked group ran out of memory starts once the group's
    tensors are gone: inside the ``except`` clause its traceback kept them alive (K stacked
    parameters, gradients, momenta, activations), so the fallback would likely run out again."""
    import weakref

    from cts_pipeline.config.sweep import Branch
    from cts_pipeline.core.train.recipe import TrainRecipe
    from cts_pipeline.pipelines.tickets import nodes

    train, test, model, runtime, theta = digits_payloads
    runtime = runtime.replace(batch_sparsities=True)
    group = [Branch("cts_kl", 0, s, family="cts", settings={"objective": "kl", "epochs": 1}) for s in (0.8, 0.9)]
    scores = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(0))
              for k, v in theta.items() if k.endswith("weight") and v.dim() > 1}
    payloads = [nodes.topk_mask(scores, b) for b in group]
    group_tensors, alive_at = [], {}

    def stacked_out_of_memory(*args, **kwargs):
        stacked_state = torch.zeros(4096)  # stands for the group's stacked tensors, held by this frame
        group_tensors.append(weakref.ref(stacked_state))
        raise torch.OutOfMemoryError("CUDA out of memory")

    real_retrain = nodes.retrain_ticket

    def one_ticket(*args, **kwargs):
        alive_at.setdefault("fallback", group_tensors[0]() is not None)
        return real_retrain(*args, **kwargs)

    monkeypatch.setattr(nodes, "train_tickets", stacked_out_of_memory)
    monkeypatch.setattr(nodes, "release_cached_memory",
                        lambda: alive_at.setdefault("release", group_tensors[0]() is not None))
    monkeypatch.setattr(nodes, "retrain_ticket", one_ticket)
    out = nodes.retrain_tickets(train, test, model, TrainRecipe(epochs=1, batch_size=64, lr=0.1), runtime, theta,
                                *payloads, *group)
    assert [out[f"{b.namespace}.retrain_log"]["retrain_path"] for b in group] == ["single", "single"]
    assert alive_at == {"release": False, "fallback": False}


def test_micro_batches_retry_once_the_failed_steps_tensors_are_gone(monkeypatch):
    import weakref

    from cts_pipeline.core.train import memory

    step_tensors, alive_at_release = [], []
    monkeypatch.setattr(memory, "release_cached_memory",
                        lambda: alive_at_release.append(step_tensors[-1]() is not None))

    def step(count):
        activations = torch.zeros(4096)
        step_tensors.append(weakref.ref(activations))
        if count == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return count

    assert memory.MicroBatches(limit=8, stage="s").run(step) == 2
    assert alive_at_release == [False]


def test_a_probe_that_runs_out_of_memory_chooses_one_at_a_time(monkeypatch, caplog):
    import logging

    from cts_pipeline.config.sections import RuntimeConfig
    from cts_pipeline.pipelines import common

    def probe():
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(common, "release_cached_memory", lambda: None)
    with caplog.at_level(logging.WARNING, logger="cts_pipeline"):
        assert not common.batched_if_faster(RuntimeConfig(batch_sparsities="auto"), "g", probe, 3, "w", "training",
                                            "them stacked")
    assert "the probe of 3 rows at once ran out of device memory; training one at a time" in caplog.text


# --- loader workers (item 8) and torch.compile with DDP (item 9) --------------------------------


def test_loader_workers_default_to_the_cpus_less_one_per_process(monkeypatch):
    from cts_pipeline.pipelines import common

    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert common.default_data_workers(1) == 15 and common.default_data_workers(4) == 3
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0})
    assert common.default_data_workers(1) == 1


def test_compile_wraps_the_ddp_model_not_the_other_way_round(monkeypatch):
    from cts_pipeline.core.train import loop as training

    wrapped = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda m: wrapped.append(("ddp", m)) or "ddp")
    monkeypatch.setattr(torch, "compile", lambda m: wrapped.append(("compile", m)) or "compiled")
    model = torch.nn.Linear(2, 2)
    assert training.training_forward(model, 4, True) == "compiled"
    assert wrapped == [("ddp", model), ("compile", "ddp")]
    wrapped.clear()
    assert training.training_forward(model, 1, False) is model and wrapped == []


def test_a_step_whose_backward_ran_out_of_memory_repeats_from_the_same_noise(monkeypatch):
    """An out-of-memory error in the backward frees the soft mask's graph: the repeat rebuilds it
    from the noise already drawn (no new draw), so the step is still the plain one."""
    from cts_pipeline.core.cts import OBJECTIVES, search
    from cts_pipeline.core.device.runtime import UniformNoise
    from cts_pipeline.core.train.memory import MicroBatches

    def gradient(micro):
        model, relaxation, x, y = _lenet_search(0.05)
        return search._objective_and_gradient(model, relaxation, OBJECTIVES["kl"],
                                              UniformNoise("cpu", 0, "concrete-noise", 0), x, y, 100.0, micro)[1]

    plain = gradient(None)
    real = search._whole_batch_gradient

    def backward_fails(model, relaxation, objective, soft, x, y, loss_scale):
        loss = search._objective(model, relaxation, objective, soft, x, y)
        torch.autograd.grad(loss.sum(), relaxation.logits)  # the graph is gone, as after a failed backward
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(search, "_whole_batch_gradient", backward_fails)
    micro = MicroBatches(1, limit=32, stage="s")
    repeated = gradient(micro)
    monkeypatch.setattr(search, "_whole_batch_gradient", real)
    assert micro.count == 2
    torch.testing.assert_close(repeated, plain, rtol=1e-4, atol=1e-5 * float(plain.abs().max()))


@pytest.mark.parametrize("error, kept", [(1e-13, True), (1e-3, False)], ids=["rounding", "a layout bug"])
def test_the_stacked_check_tells_rounding_from_a_wrong_layout(monkeypatch, caplog, error, kept):
    """float64 rounding relative to the outputs' size passes (large logits included); an error of
    a thousandth of the outputs sends the search to vmap with one warning naming the stage."""
    import logging

    from cts_pipeline.core.cts import ConcreteMask, forwards
    from cts_pipeline.core.nets.masks import prunable_parameters
    from cts_pipeline.core.nets.registry import build_model

    model = build_model("convnet", image_shape=(1, 8, 8), num_classes=10, width=4,
                        generator=torch.Generator().manual_seed(0))
    relaxation = ConcreteMask(prunable_parameters(model), [0.1, 0.3])
    real = forwards.stacked_forward

    def off_by(model, weights, x):
        out = real(model, weights, x) * 1000.0  # large logits, as batch statistics over few samples give
        return out + error * out.abs().max()

    monkeypatch.setattr(forwards, "stacked_forward", off_by)
    real_vmap = forwards.masked_forward

    def reference_scaled(model, relaxation, soft, x):
        out = real_vmap(model, relaxation, soft, x)
        return out if relaxation.stacked else out * 1000.0

    monkeypatch.setattr(forwards, "masked_forward", reference_scaled)
    with caplog.at_level(logging.WARNING, logger="cts_pipeline"), forwards.batch_statistics(model):
        assert forwards.check_stacked(model, relaxation, torch.randn(16, 1, 8, 8), "cts_kl.seed0 search") is kept
    assert ("cts_kl.seed0 search: the stacked batched forward differs from vmap" in caplog.text) is not kept


def test_a_training_step_that_does_not_fit_names_the_recipe_settings_in_one_line():
    """Dense training has no memory plan (its batch is the recipe's): the one-line message says
    which settings change that, and the exit code is a failed run's."""
    from cts_pipeline.errors import FAILED_RUN_EXIT, describe, mark_failed_node

    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB. GPU 0 has a total capacity of "
                                   "139.80 GiB of which 3.10 GiB is free.\nOf the allocated memory ...")
    mark_failed_node(error, "train_dense")
    message, code = describe(error)
    assert code == FAILED_RUN_EXIT and "\n" not in message
    assert message.startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 24.00 GiB.")
    assert "lower training.batch_size, or set training.virtual_ranks: N" in message


def test_nhwc_is_not_used_where_this_cpu_kernel_corrupts_memory(caplog):
    """torch 2.14.1's oneDNN on AVX2: a strided 1x1 convolution with fewer than 8 input channels
    corrupts memory in its NHWC backward (a ResNet-20 of width 4 segfaults or hangs within a few
    steps). ``auto`` then trains in NCHW; an explicit ``true`` says why it is not honoured; GPUs
    and models without such a layer keep NHWC."""
    import logging

    from cts_pipeline.config.sections import RuntimeConfig
    from cts_pipeline.core.device.runtime import channels_last_hazard
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.pipelines.common import uses_channels_last

    def resnet(width, shortcut="conv1x1"):
        return build_model("resnet20", image_shape=(3, 32, 32), num_classes=10, width=width, shortcut=shortcut)

    narrow = resnet(4)
    assert channels_last_hazard(narrow, "cpu") == "blocks.3.shortcut.0"
    assert channels_last_hazard(narrow, "cuda") is None
    for safe in (resnet(16), resnet(8), resnet(4, "zeropad"), resnet(4, "conv3x3")):
        assert channels_last_hazard(safe, "cpu") is None
        assert uses_channels_last(RuntimeConfig(), safe)
    assert not uses_channels_last(RuntimeConfig(), narrow)
    with caplog.at_level(logging.WARNING, logger="cts_pipeline"):
        assert not uses_channels_last(RuntimeConfig(channels_last=True), narrow)
    assert "layer blocks.3.shortcut.0's backward pass corrupts memory in NHWC" in caplog.text
    assert not uses_channels_last(RuntimeConfig(channels_last=False), resnet(16))


# What the GPU machine lacks, from the device library's package list (its image has torch 2.11,
# torchvision, numpy, scikit-learn, pillow, tqdm, safetensors and rich, but none of these).
MISSING_ON_THE_GPU_MACHINE = ("kedro", "kedro_datasets", "kedro_viz", "mlflow", "dask", "distributed", "pydantic",
                              "omegaconf")

# Runs each part of gpu.sh as `python benchmarks/X.py ARGS` would, up to its argument parsing: the
# script's imports and its flags, without the measurements.
_PARSE_ONLY = """
import argparse, json, runpy, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in MISSING:
            raise ImportError('not on the GPU machine: ' + name)
class Parsed(Exception):
    pass
parse_args = argparse.ArgumentParser.parse_args
def parse_only(self, *args, **kwargs):
    parse_args(self, *args, **kwargs)
    raise Parsed
sys.meta_path.insert(0, Refuse())
argparse.ArgumentParser.parse_args = parse_only
for script, flags in json.loads(sys.argv[1]):
    sys.argv = [script, *flags]
    sys.path.insert(0, script.rpartition('/')[0])  # as `python script` puts its folder first
    try:
        runpy.run_path(script, run_name='__main__')
    except Parsed:
        print('parsed', script)
    else:
        raise SystemExit(script + ' ran past its argument parsing')
"""


def test_gpu_sh_parts_load_on_the_gpu_machines_stack_and_fit_one_device_call():
    """``benchmarks/gpu.sh`` is the first call a session lent a GPU makes, on a machine with torch
    but without Kedro, MLflow, Dask or pydantic, and its time is scarce (15 min a session). So,
    before any GPU is paid for: each part's script imports without those packages and accepts the
    flags gpu.sh gives it, and the parts' limits add up to less than the call's 560 s."""
    import json
    import os
    import shlex
    import subprocess
    import sys

    parts = [shlex.split(line) for line in (PROJECT_ROOT / "benchmarks/gpu.sh").read_text().splitlines()
             if line.startswith("part ")]
    assert [p[2] for p in parts] == ["speed", "batched", "grid_epochs", "resnet50", "launches"]
    assert sum(int(p[1]) for p in parts) <= 540, "the parts must end inside one 560 s device call"
    assert all(p[3] == "$PYTHON" and p[5:].count("$WRITE") == 1 for p in parts), "each part writes its table"
    as_on_the_gpu = {"$DEVICE": "cuda", "$WRITE": "--write-docs"}  # gpu.sh without arguments
    scripts = [(p[4], [as_on_the_gpu.get(flag, flag) for flag in p[5:]]) for p in parts]
    code = f"MISSING = {MISSING_ON_THE_GPU_MACHINE!r}\n" + _PARSE_ONLY
    done = subprocess.run([sys.executable, "-c", code, json.dumps(scripts)], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": "src"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [w for script, _ in scripts for w in ("parsed", script)]


@pytest.fixture
def benchmarks(monkeypatch):
    """The benchmark scripts importable as ``python benchmarks/X.py`` finds them (its folder first)."""
    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "benchmarks"))


def test_a_benchmark_table_is_on_disk_line_by_line_and_marked_partial_until_it_finishes(tmp_path, benchmarks):
    """gpu.sh's parts each run under a time limit, and a GPU's first timings are unknown: a part
    stopped halfway must keep the lines it measured, say that it stopped, and lose that mark once
    it finishes."""
    import docs_blocks as blocks
    doc = tmp_path / "performance.md"
    doc.write_text("before\n<!-- t:begin -->\nold table\n<!-- t:end -->\nafter\n")
    table = blocks.BlockWriter(str(doc), "t", to_docs=True)
    table.add("| a | b |", "|---|---|")
    table.add("| 1 | 2 |")
    assert blocks.read_block(str(doc), "t") == f"| a | b |\n|---|---|\n| 1 | 2 |\n\n{blocks.PARTIAL}"
    table.finish()
    assert doc.read_text() == "before\n<!-- t:begin -->\n| a | b |\n|---|---|\n| 1 | 2 |\n<!-- t:end -->\nafter\n"
    with pytest.raises(SystemExit, match="has no <!-- missing:begin -->"):  # before any measurement
        blocks.BlockWriter(str(doc), "missing", to_docs=True)
    blocks.BlockWriter(str(doc), "missing", to_docs=False).add("printed only")
    assert "printed only" not in doc.read_text()


def test_a_docs_block_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch, benchmarks):
    """``timeout`` may kill a part while it writes: the file is the old one or the new one."""
    import docs_blocks as blocks
    doc = tmp_path / "performance.md"
    original = "<!-- t:begin -->\nold\n<!-- t:end -->\n"
    doc.write_text(original)
    doc.chmod(0o644)

    def killed_while_renaming(*_):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(blocks.os, "replace", killed_while_renaming)
        with pytest.raises(KeyboardInterrupt):
            blocks.replace_block(str(doc), "t", "new")
    assert doc.read_text() == original and [p.name for p in tmp_path.iterdir()] == ["performance.md"]
    blocks.replace_block(str(doc), "t", "new")
    assert doc.read_text() == "<!-- t:begin -->\nnew\n<!-- t:end -->\n" and doc.stat().st_mode & 0o777 == 0o644


def test_a_part_stopped_by_its_time_limit_keeps_what_it_measured(tmp_path, benchmarks):
    """As gpu.sh's ``part`` does: ``timeout`` sends SIGTERM to a benchmark that is still measuring."""
    import os
    import signal
    import subprocess
    import sys

    doc = tmp_path / "performance.md"
    doc.write_text("<!-- t:begin -->\n<!-- t:end -->\n")
    script = (f"import sys, time; sys.path.insert(0, {str(PROJECT_ROOT / 'benchmarks')!r})\n"
              "from docs_blocks import BlockWriter\n"
              f"table = BlockWriter({str(doc)!r}, 't', to_docs=True)\n"
              "table.add('| measured | 1.00 |')\n"
              "print('measured', flush=True)\n"
              "time.sleep(60)  # the next measurement, which the limit cuts short\n"
              "table.add('| never | 2.00 |')\n")
    part = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")})
    try:
        assert part.stdout.readline().strip() == "| measured | 1.00 |"
        assert part.stdout.readline().strip() == "measured"
        part.send_signal(signal.SIGTERM)
        assert part.wait(timeout=30) == -signal.SIGTERM
    finally:
        part.kill()
    import docs_blocks as blocks
    assert blocks.read_block(str(doc), "t") == f"| measured | 1.00 |\n\n{blocks.PARTIAL}"


def test_the_speed_table_keeps_earlier_lines_while_partial_and_only_other_rows_once_finished(tmp_path, benchmarks):
    """Each line of the speed table carries its date. Halfway through a run, the lines it has not
    reached yet are the earlier run's, in their places; the finished run drops the earlier lines of
    the rows it measured."""
    import datetime

    from speed import SpeedTable

    doc = tmp_path / "performance.md"
    old = ["| 1 | loop A | t | **0.90** | ≥ 0.95 | no | 2026-01-01 |",
           "| 1 | loop B | t | **0.97** | ≥ 0.95 | yes | 2026-01-01 |",
           "| 2 | step C | t | **1.30** | ≤ 1.5 | yes | 2026-01-01 |"]
    doc.write_text("<!-- speed-cpu:begin -->\n" + "\n".join(old) + "\n<!-- speed-cpu:end -->\n")
    table = SpeedTable(torch.device("cpu"), to_docs=True, doc=str(doc))
    table.add(1, "loop A", "t2", "0.99", "≥ 0.95", True)
    today = datetime.date.today()
    fresh = f"| 1 | loop A | t2 | **0.99** | ≥ 0.95 | yes | {today} |"
    body = doc.read_text()
    assert body.index(fresh) < body.index(old[1]) < body.index(old[2]) < body.index("*Partial:")
    assert old[0] not in body
    table.write()
    body = doc.read_text()
    assert fresh in body and old[2] in body and old[1] not in body and "*Partial:" not in body


def test_the_gpu_batched_part_measures_resnet20_before_the_small_networks(monkeypatch, benchmarks):
    """A time limit cuts a part's end, so gpu.sh's batched part measures what a GPU is for first:
    ResNet-20's batched search and stacked retraining at K = 5 and 15."""
    import batched

    order = []
    monkeypatch.setattr(batched, "measure", lambda label, model, *a, **k: order.append(("search", model)) or "|")
    monkeypatch.setattr(batched, "measure_retraining",
                        lambda label, model, *a, **k: order.append(("retraining", model)) or "|")

    class NoImages:  # the rows are not measured, so no split is needed
        def to(self, device):
            return self

        def subset(self, n):
            return self

    monkeypatch.setattr(batched, "synthetic", lambda name, n, device: NoImages())
    monkeypatch.setattr(batched, "load_splits", lambda name, root=None: (NoImages(), NoImages()))
    monkeypatch.setattr("sys.argv", ["batched.py", "--device", "cpu", "--resnet"])
    batched.main()
    assert order == [("search", "resnet20")] * 2 + [("retraining", "resnet20")] * 2 + [
        ("search", "convnet"), ("search", "lenet_300_100"), ("retraining", "convnet"), ("retraining", "lenet_300_100")]


@pytest.mark.parametrize("script", ["speed.py", "batched.py", "grid_epochs.py", "resnet50_throughput.py"])
def test_quick_figures_are_refused_for_the_docs_in_one_line_before_anything_is_measured(script):
    """``--quick`` checks a script; its figures say nothing. Asked to write them into the docs, the
    script says so in one line and exits 1 before it measures, and the docs are untouched."""
    import os
    import subprocess
    import sys

    doc = PROJECT_ROOT / "docs/performance.md"
    before = doc.read_bytes()
    done = subprocess.run([sys.executable, f"benchmarks/{script}", "--quick", "--write-docs", "--device", "cpu"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": "src"})
    assert done.returncode == 1
    assert done.stderr == "--quick checks the script; its figures say nothing and are not written\n"
    assert done.stdout == ""  # nothing measured, not even the table's first line
    assert doc.read_bytes() == before
