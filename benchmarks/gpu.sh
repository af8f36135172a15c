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
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
"$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

part() {  # part SECONDS NAME COMMAND...: run it under a limit, keep its log, say how it ended
    local limit=$1 name=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $?"
    tail -n 25 "$OUT/$name.log"
}

# Rows 1-3 of the speed table: the training loop, the search step against the training step
# (ResNet-20 and VGG-16 at batch 512, with each step's peak memory), the data path.
part 120 speed "$PYTHON" benchmarks/speed.py --device cuda --rows 1,2,3 --write-docs
# Batched against one-at-a-time search (the path each took: stacked or vmap) and retraining
# (stacked, in the default bf16), ResNet-20 at K = 5 and K = 15 first, then the small networks,
# with peak memory.
part 180 batched "$PYTHON" benchmarks/batched.py --device cuda --resnet --write-docs
# The whole grid against LTR per epoch of work, ResNet-20 on CIFAR-shaped noise.
part 80 grid_epochs "$PYTHON" benchmarks/grid_epochs.py --device cuda --write-docs
# ResNet-50 throughput and peak memory: fp32, bf16 and fp16, channels_last, the DDP wrapper alone.
part 140 resnet50 "$PYTHON" benchmarks/resnet50_throughput.py --device cuda --write-docs
cp docs/performance.md "$OUT/performance.md"
