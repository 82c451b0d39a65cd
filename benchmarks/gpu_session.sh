#!/usr/bin/env bash
# Everything a session with a GPU should run, in as few device calls as possible (each call may run
# 10 minutes; a session has 30 minutes of device time). From the repository root, first here:
#     bash ../shared/tools/gpu-wheels.sh          # fills .whl/ with open_clip and its small needs
# then, through the device tool, with carry [".whl"]:
#     bash benchmarks/gpu_session.sh tests         # CUDA correctness (tests/test_cuda.py) + kernels compile
#     bash benchmarks/gpu_session.sh bench         # the benchmark suite -> $OUT/RESULTS.json + report
#     bash benchmarks/gpu_session.sh bench -k "train_step or loss"   # a subset, when time is short
# Copy $OUT/report.md into benchmarks/RESULTS.md with the device, versions and date it prints.
set -uo pipefail
what=${1:-tests}; shift || true
OUT=${OUT:-/tmp/harma_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch, triton, open_clip; print('torch', torch.__version__, 'triton', triton.__version__,
'open_clip', open_clip.__version__)"; date -u; } | tee "$OUT/versions.txt"
case "$what" in
  tests) python3 -m pytest tests/test_cuda.py tests/test_kernels_compile.py -q -rs 2>&1 | tee "$OUT/cuda_tests.log" ;;
  bench) python3 -m pytest benchmarks/ -q "$@" --benchmark-json="$OUT/RESULTS.json" 2>&1 | tail -n 40 | tee "$OUT/bench.log"
         python3 -m benchmarks.report "$OUT/RESULTS.json" --markdown "$OUT/report.md" --png "$OUT/speedups.png"
         cat "$OUT/report.md" ;;
  *) echo "usage: gpu_session.sh tests|bench [pytest args]"; exit 2 ;;
esac
