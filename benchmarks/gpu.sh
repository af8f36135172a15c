#!/usr/bin/env bash
# Every GPU measurement that docs/performance.md waits for, in one call of the device tool. Its
# machine has torch but neither Kedro nor MLflow, and these benchmarks are plain PyTorch:
#
#     run(command="bash benchmarks/gpu.sh", timeout_s=560)
#
# Each part has its own time limit, so a slow part cannot cost the others (at most 8 min 40 s in all,
# inside the session's 15 min of device time with the machine's start). Each part writes its table
# line by line, so one that its limit stops keeps what it measured, marked partial. The rewritten
# docs/performance.md and every part's log come back under $OUT; copy the file over the local one.
#
#     bash benchmarks/gpu.sh --device cpu --quick    # every part and row at toy sizes, nothing written
#                                                    # (about a minute on 2 cores; a test keeps it working)
set -u
DEVICE=cuda
WRITE=--write-docs   # --quick instead: each script checks itself at toy sizes and writes nothing
while [ $# -gt 0 ]; do
    case $1 in
        --device) DEVICE=$2; shift 2 ;;
        --quick) WRITE=--quick; shift ;;
        *) echo "gpu.sh: unknown argument $1 (use --device DEVICE, --quick)" >&2; exit 2 ;;
    esac
done
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [ "$DEVICE" != cpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
    "$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
    cat "$OUT/gpu.txt"
fi

part() {  # part SECONDS NAME COMMAND...: run it under a limit, keep its log, say how it ended
    local limit=$1 name=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $?"
    tail -n 25 "$OUT/$name.log"
}

# Rows 1-3 and 6 of the speed table: the training loop against a hand-written one at the same
# precision, the search step against the training step (ResNet-20 and VGG-16 at batch 512, with
# each step's peak memory), the data path, and the cifar10_resnet20 preset's own training and
# search steps (fp16, 4 virtual ranks) against the plain one-rank bf16 steps.
part 130 speed "$PYTHON" benchmarks/speed.py --device "$DEVICE" --rows 1,2,3,6 $WRITE
# Batched against one-at-a-time search (the path each took: stacked or vmap) and retraining
# (stacked, in the default bf16), ResNet-20 at K = 5 and K = 15 first, then the small networks,
# with peak memory.
part 150 batched "$PYTHON" benchmarks/batched.py --device "$DEVICE" --resnet $WRITE
# The whole grid against LTR per epoch of work: the cifar10_resnet20 preset as conf/ gives it, on
# CIFAR-shaped noise.
part 80 grid_epochs "$PYTHON" benchmarks/grid_epochs.py --device "$DEVICE" $WRITE
# ResNet-50 throughput and peak memory: fp32 (TF32), bf16 and fp16, NCHW and channels_last.
part 100 resnet50 "$PYTHON" benchmarks/resnet50_throughput.py --device "$DEVICE" $WRITE
# Operations dispatched and GPU time per ticket-step: the cifar10_resnet20 preset's training and
# search with its 4 virtual ranks one after another and in one pass, its K tickets' retraining; the
# default's too, with its grid's 3 seeds as rows (runtime.stack_seeds).
part 60 launches "$PYTHON" benchmarks/launches.py --device "$DEVICE" --presets cifar10_resnet20,base $WRITE
cp docs/performance.md "$OUT/performance.md"
