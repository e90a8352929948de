#!/usr/bin/env bash
# The speed checks to run on a GPU, as one script of under 10 minutes on one GPU:
#   1. Monte-Carlo sweeps of LeNet-5 (bundled MNIST), the paper and pcm devices
#      (benchmarks/montecarlo.py: evaluate_chips against a one-chip loop and sgemm);
#   2. the training step of pimjax (fp, qat, qavat) against PyTorch, both on the GPU
#      (benchmarks/train_step.py --torch-device cuda);
#   3. the quickstart at full size (60,000 training and 10,000 test images, 10 epochs).
# Each part writes $OUT/<part>.txt (default OUT: gpu-check) under its own time limit; a part
# cut off by its limit keeps what it printed, and the next part runs. $OUT/summary.txt lists
# each part's exit status and seconds (124: its limit was reached).
#
#   OUT=gpu-check bash benchmarks/gpu_check.sh            # on the GPU machine
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh --small   # the same parts at CPU size
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

part() {  # part NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$out/summary.txt"
    local start=$SECONDS rc=0
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1 || rc=$?
    echo "   exit $rc after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    tail -n 12 "$out/$name.txt"
}

python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$out/summary.txt"
case "${1:-}" in
    --small)
        part montecarlo 300 python benchmarks/montecarlo.py --devices paper,pcm \
            --lenet-splits 20x200 --resnet-splits '' --loop-chips 4
        part train_step 300 python benchmarks/train_step.py --models lenet5 --steps 2 \
            --repeats 1 --torch-device cpu
        part quickstart 300 python experiments/quickstart.py --smoke --no-progress \
            --out "$out/quickstart"
        ;;
    "")
        part montecarlo 200 python benchmarks/montecarlo.py --devices paper,pcm \
            --lenet-splits 10000x1000,1000x10000 --resnet-splits '' --budget-mb 32768
        part train_step 120 python benchmarks/train_step.py --models lenet5,resnet20,resnet18 \
            --torch-device cuda
        part quickstart 240 python experiments/quickstart.py --epochs 10 --train-images 60000 \
            --test-images 10000 --no-progress --out "$out/quickstart"
        ;;
    *)
        echo "gpu_check.sh: unknown option $1: use --small or nothing" >&2
        exit 2
        ;;
esac
