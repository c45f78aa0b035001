#!/usr/bin/env bash
# The README's NVIDIA GPU figures in one pass, each part under its own time limit, logs and JSON
# in $OUT (default ./gpu_report): gpt2 training against torch.compile (batch 16 and 32), the
# attention kernels, cached decoding (also with XLA's command buffers around the decoding
# loop), a per-op profile of the step, and the op and model tests on the GPU: at most 9 min.
#   OUT=/tmp/gpu bash experiments/gpu_report.sh
set -uo pipefail
OUT=${OUT:-gpu_report}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  python -c "import torch; print('torch', torch.__version__)"; } > "$OUT/device.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...: run it, keep its log, show the table at its end
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  tail -n 30 "$OUT/$name.log"
}

bench="python experiments/benchmark.py --configure_cpu=0 --allocator=default"
part train 170 $bench --sections=train --models=gpt2 --frameworks=jax,torch_compile \
  --repeats=2 --round_seconds=1 --variant=b32:batch=32 --out="$OUT/train.json"
part attention 60 $bench --sections=attention --frameworks=jax,torch --attention_batch=4 \
  --attention_heads=12 --attention_lengths=1024,4096 --out="$OUT/attention.json"
part decoding 80 $bench --sections=decoding --decoding_model=gpt2 --decoding_batch=1,8 \
  --out="$OUT/decoding.json"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
  part decoding_command_buffers 80 $bench --sections=decoding --decoding_model=gpt2 \
  --decoding_batch=1,8 --out="$OUT/decoding_command_buffers.json"
# Command buffers hide the ops' names from the profiler: off for the per-op profile.
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
  part profile 60 $bench --sections=profile --models=gpt2 --out="$OUT/profile.json"
part tests 90 python -m pytest -q -x tests/test_ops.py tests/test_models.py
