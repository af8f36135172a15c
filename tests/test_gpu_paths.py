"""The CUDA paths, checked on a CPU (issue 34): what would crash on the first GPU call, and what
would make gpu.sh's tables describe another configuration than the pipeline runs."""

from __future__ import annotations

import pytest
import torch

from cts_pipeline.core.device.dispatched_ops import DispatchedOps

from .conftest import PROJECT_ROOT


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one CUDA device, as far as torch's queries can tell (none of its kernels)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


@pytest.fixture
def cuda_flags():
    """TF32 and cuDNN flags as they were before the test."""
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    yield
    (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
     torch.backends.cudnn.benchmark) = saved[:3]
    torch.use_deterministic_algorithms(saved[3])


# 1. A batched search resumed from a checkpoint


@pytest.mark.parametrize("balance", ["gradbalance", "lagrangian"])
def test_a_resumed_balancer_puts_its_multipliers_on_the_searchs_device(balance):
    """A checkpoint is read to the CPU; a batched search's ``[K, 1]`` multiplier left there beside
    CUDA logits fails the next step (a one-density search's 0-d tensor would not: CPU scalars mix
    with CUDA tensors). The meta device stands in for CUDA."""
    from cts_pipeline.core.cts.balance import make_balancer

    on_cpu = make_balancer(balance, [0.1, 0.02], 1000, 0.1)
    logits = torch.zeros(2, 1000)
    on_cpu.combine(logits, torch.randn(2, 1000))
    saved = on_cpu.state_dict()
    assert saved["multiplier"].shape == (2, 1)
    resumed = make_balancer(balance, [0.1, 0.02], 1000, 0.1)
    resumed.load_state_dict(saved, device=torch.device("meta"))
    assert resumed.multiplier.device.type == "meta"
    resumed.combine(logits.to("meta"), torch.randn(2, 1000, device="meta"))  # the next step


def test_a_batched_search_resumes_with_every_state_tensor_on_its_device(tmp_path, monkeypatch):
    """The search hands the balancer its logits' device when it restores a checkpoint."""
    from cts_pipeline.core.artifacts.checkpoints import Checkpoint
    from cts_pipeline.core.cts import SearchConfig, balance, concrete_search
    from cts_pipeline.core.data.splits import load_splits
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.core.train.recipe import TrainRecipe

    train_split, _ = load_splits("digits", None)
    train_split = train_split.subset(256)
    recipe = TrainRecipe(epochs=2, batch_size=128, lr=0.1)
    net = build_model("lenet_300_100", image_shape=(1, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(0))
    checkpoint = Checkpoint(tmp_path / "search.pt", key="k")
    stop = RuntimeError("stopped after epoch 1")

    def stop_after_first_save(state, _save=Checkpoint.save):
        _save(checkpoint, state)
        raise stop

    monkeypatch.setattr(checkpoint, "save", lambda state: stop_after_first_save(state))
    with pytest.raises(RuntimeError, match="stopped after epoch 1"):
        concrete_search(net, train_split, density=[0.1, 0.05], config=SearchConfig(), recipe=recipe, seed=0,
                        checkpoint=checkpoint, progress=False)
    monkeypatch.undo()
    devices = []
    loaded = balance.GradBalance.load_state_dict

    def remember_device(self, state, device=None):
        devices.append(device)
        loaded(self, state, device)

    monkeypatch.setattr(balance.GradBalance, "load_state_dict", remember_device)
    results = concrete_search(net, train_split, density=[0.1, 0.05], config=SearchConfig(), recipe=recipe, seed=0,
                              checkpoint=Checkpoint(tmp_path / "search.pt", key="k"), progress=False)
    assert results[0].resumed_at == 1 and devices == [torch.device("cpu")]


# 3. torchrun's backend


def test_torchrun_joins_with_the_backend_of_the_run_device_not_of_the_machine(one_gpu, monkeypatch):
    """``runtime.device: cpu`` under torchrun on a GPU machine: gloo, and no GPU taken (NCCL would
    be handed CPU tensors)."""
    import torch.distributed as dist

    from cts_pipeline.core.device.distributed import join_torchrun_group

    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29533"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("took a GPU for a CPU run"))
    join_torchrun_group(torch.device("cpu"))
    try:
        assert dist.get_backend() == "gloo"
    finally:
        dist.destroy_process_group()


def test_every_torchrun_rank_reads_the_run_device_from_the_same_configuration(project, one_gpu):
    from kedro.framework.startup import bootstrap_project

    from cts_pipeline.pipelines import torchrun

    bootstrap_project(project)
    assert torchrun.run_device(None, None, {"runtime": {"device": "cpu"}}) == torch.device("cpu")
    assert torchrun.run_device("smoke", None, None).type == "cuda"  # auto, on a machine with a GPU


# 4. and 5. The CUDA policy where the pipeline does not run it, and what the hardware line says


def test_find_ticket_and_retraining_run_under_the_pipelines_cuda_policy(monkeypatch):
    """A notebook's ticket trains with the TF32 and cuDNN settings the pipeline uses, so its
    timings and results compare with the pipeline's."""
    from cts_pipeline import api
    from cts_pipeline.core.device.runtime import CudaPolicy

    applied = []
    monkeypatch.setattr(CudaPolicy, "apply", lambda self, device: applied.append((self, device.type)))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10))
    x, y = torch.randn(64, 16), torch.randint(0, 10, (64,))
    ticket = api.find_ticket(net, x, y, sparsity=0.5, epochs=1, batch_size=32)
    ticket.retrain(net, x, y, recipe=api.RETRAIN_DEFAULTS.__class__(epochs=1, batch_size=32, lr=0.01))
    assert applied == [(CudaPolicy(), "cpu"), (CudaPolicy(), "cpu")]


def test_no_benchmark_picks_its_device_without_the_cuda_policy():
    """gpu.sh's tables measure the pipeline's configuration: every benchmark takes its device from
    ``training_device`` (cudnn.benchmark and TF32 as the pipeline sets them), never bare."""
    scripts = sorted((PROJECT_ROOT / "benchmarks").glob("*.py"))
    bare = [s.name for s in scripts if "resolve_device(" in s.read_text()]
    assert bare == []
    for name in ("speed.py", "batched.py", "grid_epochs.py", "resnet50_throughput.py"):
        assert "training_device(" in (PROJECT_ROOT / "benchmarks" / name).read_text(), name


def test_the_hardware_line_names_tf32_for_matmuls_and_convolutions_apart(one_gpu, cuda_flags, monkeypatch):
    """cuDNN's convolutions default to TF32 where cuBLAS's matmuls do not: a line reading the matmul
    flag alone says "TF32 off" while the convolutions run in TF32."""
    from cts_pipeline.core.device.runtime import CudaPolicy, describe_hardware, tf32_modes

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # torch's defaults
    assert tf32_modes() == (False, True)
    assert "TF32 matmul off, TF32 conv on" in describe_hardware(torch.device("cuda"))
    CudaPolicy(tf32=True).apply(torch.device("cuda"))
    assert "TF32 matmul on, TF32 conv on, cudnn.benchmark on" in describe_hardware(torch.device("cuda"))


# The whole of gpu.sh, at toy sizes on a CPU


def test_gpu_sh_runs_every_part_and_prints_every_row_on_a_cpu(tmp_path):
    """A session lent a GPU runs ``benchmarks/gpu.sh`` once, first: every part must run to its end
    and print each of its rows (the preset rows included), which this run at toy sizes on a CPU
    checks without a GPU, writing nothing into the docs."""
    import os
    import subprocess
    import sys

    doc = PROJECT_ROOT / "docs/performance.md"
    before = doc.read_bytes()
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--device", "cpu", "--quick"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    parts = ("speed", "batched", "grid_epochs", "resnet50", "launches")
    for part in parts:
        assert f"== {part}: exit 0" in done.stdout, (tmp_path / f"{part}.log").read_text()[-3000:]
    logs = {part: (tmp_path / f"{part}.log").read_text() for part in parts}
    table = [line for line in logs["speed"].splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split("|")[1].strip() for line in table] == ["1", "1", "2", "2", "2", "3", "6", "6"]
    assert sum("preset runs it" in line for line in table) == 2
    assert sum(line.startswith("| ") and "K = " in line for line in logs["batched"].splitlines()) == 8
    grid = logs["grid_epochs"]
    assert "the `cifar10_resnet20` preset: resnet20 (shortcut conv3x3, bn_running_stats False" in grid
    assert "4 virtual ranks" in grid and "retraining epoch of the K tickets, stacked" in grid
    assert grid.count("| CTS-KL `") == 2
    assert logs["resnet50"].count("| fp32, ") == 2
    launches = [line for line in logs["launches"].splitlines()
                if line.startswith(("| train", "| search", "| retraining", "| dense"))]
    assert len(launches) == 12 + 15 and "ranks in one pass (ghost BatchNorm" in launches[2]
    assert "ranks as rows of one pass" in launches[5] and "ranks as rows of one pass" in launches[8]
    assert "3 seeds stacked (`stack_seeds`)" in launches[24] and "5 densities × 3 seeds as rows" in launches[25]
    assert "5 densities × 3 seeds stacked" in launches[26]
    assert doc.read_bytes() == before


@pytest.mark.parametrize("name", ["cifar10_resnet20", "cifar10_vgg16", "cifar100_resnet20", "mnist_lenet"])
def test_the_benchmarks_read_a_preset_as_the_pipeline_runs_it(project, name, monkeypatch):
    """benchmarks/presets.py reads conf/ with plain YAML (the GPU machine has no Kedro): its recipe,
    search, network and grid equal the pipeline's validated ones, so no benchmark can drift from
    the preset it claims to cost."""
    from kedro.framework.startup import bootstrap_project

    from cts_pipeline.config import active
    from cts_pipeline.config.sections import typed_sections

    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "benchmarks"))
    from presets import preset

    bootstrap_project(project)
    sections = typed_sections(active.parameters(active.project_config_loader(name, None, None)))
    read = preset(name)
    assert read.recipe == sections["training"] and read.search == sections["cts"]
    assert (read.model, read.model_options) == (sections["model"].name, dict(sections["model"].options))
    assert read.levels == tuple(sections["grid"].levels) and read.dataset == sections["data"].name


# 10. The memory plan's probe


class FakeCudaMemory:
    """torch.cuda's memory counters, driven by the probe steps a test runs (no kernels)."""

    def __init__(self, free: int, reserved: int, allocated: int):
        self.free, self.reserved, self.allocated, self.peak = free, reserved, allocated, allocated

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (self.free, 80 * 2**30))
        monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "peak", self.allocated))
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
        return self

    def hold(self, nbytes: int) -> None:
        self.peak = max(self.peak, self.allocated + nbytes)


GiB = 2**30
CUDA = torch.device("cuda")


def test_the_plan_counts_the_allocators_cached_blocks_as_free(monkeypatch):
    """The driver counts PyTorch's cached blocks as used; the allocator hands them out first."""
    from cts_pipeline.core.train import memory

    FakeCudaMemory(free=10 * GiB, reserved=30 * GiB, allocated=12 * GiB).install(monkeypatch)
    assert memory.free_bytes(CUDA) == 28 * GiB


def test_the_probe_is_measured_warm_not_with_cudnns_first_call_workspaces(monkeypatch):
    """A cold first call carries cuDNN's autotuning workspaces; scaled × batch / 8 it would cut a
    batch that fits into many micro-batches."""
    from cts_pipeline.core.train import memory

    fake = FakeCudaMemory(free=40 * GiB, reserved=0, allocated=0).install(monkeypatch)
    calls = []

    def step(samples):  # 1 GiB per sample, and 20 GiB of workspace on the first call only
        fake.hold(samples * GiB + (20 * GiB if not calls else 0))
        calls.append(samples)

    assert memory.peak_bytes(CUDA, lambda: step(8)) == 8 * GiB
    calls.clear()
    assert memory.plan_micro_batches(CUDA, 16, step, "search") == 1  # 16 GiB fits 80 % of 40 GiB


def test_a_probe_whose_memory_does_not_grow_with_the_batch_is_warned_about(monkeypatch, caplog):
    from cts_pipeline.core.train import memory

    fake = FakeCudaMemory(free=40 * GiB, reserved=0, allocated=0).install(monkeypatch)
    monkeypatch.setattr(memory, "peak_bytes", lambda device, step: step())
    measured = iter([6 * GiB, 5 * GiB])  # the smaller probe took more: noise, or a cached workspace
    with caplog.at_level("WARNING"):
        rows = memory.plan_rows(CUDA, 10, 512, lambda samples: next(measured), "retraining")
    assert "could not be told from its fixed cost" in caplog.text
    assert rows == 1  # planned with 5/8 GiB a sample: 320 GiB a row at batch 512
    del fake


def test_the_row_plan_leaves_room_for_the_tickets_test_evaluation(monkeypatch):
    """Stacked tickets are evaluated together at ``eval_batch_size``, which may be far larger than
    the training batch: the plan caps the group so that evaluation fits too."""
    from cts_pipeline.core.train import memory

    FakeCudaMemory(free=100 * GiB, reserved=0, allocated=0).install(monkeypatch)
    monkeypatch.setattr(memory, "peak_bytes", lambda device, step: step())
    train_probe = {4: 4 * GiB // 100, 8: 8 * GiB // 100}  # 0.01 GiB a sample, no fixed cost
    training_only = memory.plan_rows(CUDA, 50, 64, lambda n: train_probe[n], "retraining")
    with_eval = memory.plan_rows(CUDA, 50, 64, lambda n: train_probe[n], "retraining", eval_batch=10_000,
                                 eval_probe=lambda n: n * GiB // 200)  # 0.005 GiB a sample, batch 10,000
    assert training_only == 50 and with_eval == 1


# 11. and 12. What a GPU step pays for: dispatched operations, and evaluation's precision


def _masked_pairs(model, density=0.5):
    from cts_pipeline.core.nets.masks import global_topk_mask, prunable_parameters

    g = torch.Generator().manual_seed(0)
    return global_topk_mask({n: torch.rand(w.shape, generator=g) for n, w in prunable_parameters(model).items()},
                            density)


def test_pruned_weights_are_zeroed_in_one_dispatched_operation_for_all_layers():
    from cts_pipeline.core.data.splits import load_splits
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.core.train.loop import _TrainingRun
    from cts_pipeline.core.train.recipe import TrainRecipe

    train_split, _ = load_splits("digits", None)
    net = build_model("convnet", image_shape=(1, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(0))
    run = _TrainingRun.set_up(net, train_split, TrainRecipe(epochs=1, batch_size=64, lr=0.1),
                              mask=_masked_pairs(net), start_epoch=0, channels_last=False, compile_model=False,
                              sync_batchnorm=False)
    with DispatchedOps() as ops:
        run.zero_pruned()
    assert [name for name, _ in ops.calls] == ["_foreach_mul_"], "one call for every layer, not one per layer"


def test_an_fp16_stacked_step_copies_no_weights_to_undo_a_skipped_tickets_step():
    """Undoing a skipped ticket's SGD step by copies costs twice the tickets' state per step."""
    from cts_pipeline.core.train.batched import RowScaler

    stacked = torch.randn(3, 64, 32, requires_grad=True)
    optimizer = torch.optim.SGD([stacked], lr=0.1, momentum=0.9, weight_decay=1e-3)
    scaler = RowScaler(3, torch.device("cpu"))
    for overflow in (False, True):
        stacked.grad = torch.randn(3, 64, 32)
        if overflow:
            stacked.grad[1, 0, 0] = float("inf")
        finite = scaler.unscale_([stacked])
        before = stacked.detach().clone()
        with DispatchedOps() as ops:
            scaler.step(optimizer, [stacked], finite)
        assert ops.named("clone") == []
        assert torch.equal(stacked[1], before[1]) == overflow, "the overflowing ticket's step alone is skipped"
        assert not torch.equal(stacked[0], before[0])


def test_evaluation_runs_in_the_trainings_precision_and_agrees_with_fp32_within_one_image(monkeypatch):
    """Evaluating a bf16 training in fp32 costs a GPU 10-20 % of a ResNet-20 epoch. Under bf16 (which
    a CPU runs too) the convolutions compute in bf16, and the test accuracy of the digits convnet
    is fp32's within one test image."""
    from cts_pipeline.core.data.splits import load_splits
    from cts_pipeline.core.nets.registry import build_model
    from cts_pipeline.core.train import loop
    from cts_pipeline.core.train.recipe import TrainRecipe

    train_split, test_split = load_splits("digits", None)
    net = build_model("convnet", image_shape=(1, 8, 8), num_classes=10, generator=torch.Generator().manual_seed(0))
    loop.train(net, train_split, None, TrainRecipe(epochs=2, batch_size=64, lr=0.1), seed=0, stage="t", progress=False)
    in_fp32 = loop.evaluate(net, test_split, 1000)
    with DispatchedOps() as ops:
        in_bf16 = loop.evaluate(net, test_split, 1000, precision="bf16")
    assert {dtype for _, dtype in ops.named("conv2d", "convolution")} == {torch.bfloat16}
    assert abs(in_bf16["accuracy"] - in_fp32["accuracy"]) <= 100.0 / len(test_split) + 1e-9
    assert in_fp32["accuracy"] > 80

    # The training loop's own test evaluation takes the training's precision.
    monkeypatch.setattr(loop, "effective_precision", lambda precision, device: "bf16")
    with DispatchedOps() as ops:
        loop.train(net, train_split.subset(64), test_split.subset(64), TrainRecipe(epochs=1, batch_size=64, lr=0.01),
                   seed=0, stage="t", progress=False)
    assert {dtype for _, dtype in ops.named("conv2d")} == {torch.bfloat16}, "the test evaluation, in inference mode"
