#!/usr/bin/env bash
# Everything a session with a GPU should run, in as few device calls as possible (each call may run
# 10 minutes; a session has 30 minutes of device time). From the repository root, first here:
#     bash ../shared/tools/gpu-wheels.sh          # fills .whl/ with open_clip and its small needs
# then, through the device tool, with carry [".whl"]:
#     bash benchmarks/gpu_session.sh tests         # CUDA correctness (tests/test_cuda.py) + kernels compile
#     bash benchmarks/gpu_session.sh profile       # one ViT-B-32 bf16 step at batch 512 per provider
#     bash benchmarks/gpu_session.sh check         # tests, then profile: the baseline call (~8 min)
#     bash benchmarks/gpu_session.sh bench         # the GPU suite -> $OUT/RESULTS.json + report + chart
#     bash benchmarks/gpu_session.sh bench -k "train_step or loss"   # a subset, when time is short
#     bash benchmarks/gpu_session.sh onnx          # bench_onnx.py alone (ONNX Runtime's CPU provider)
# Each phase is bounded (timeout) so one call ends inside the device's 10 minutes and brings its
# files back; at most 8 files come back per call, so each phase writes few. Copy $OUT/report.md
# into benchmarks/RESULTS.md with the device, versions and date in $OUT/versions.txt.
# Without a GPU (a rehearsal here) every phase still runs: the CUDA tests skip, the profile and
# the suite run CI-sized on the CPU.
set -uo pipefail
what=${1:-tests}; shift || true
OUT=${OUT:-/tmp/harma_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site \
    && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
else
  echo "no .whl/ here: using the installed packages (run ../shared/tools/gpu-wheels.sh for the GPU machine)"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
if command -v nvidia-smi >/dev/null; then
  export TRITON_INTERPRET=0
  gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv)
else
  gpu="no NVIDIA GPU here: a CPU rehearsal"
fi
{ echo "$gpu"
  python3 -c "import torch, triton, open_clip; print('torch', torch.__version__, 'triton', triton.__version__,
'open_clip', open_clip.__version__)"; date -u; } | tee "$OUT/versions.txt"

tests() {
  timeout 300 python3 -m pytest tests/test_cuda.py tests/test_kernels_compile.py -q -rs 2>&1 | tee "$OUT/cuda_tests.log"
}
profile() {
  # cheap providers first: profile.json is rewritten after each, so a timeout keeps what finished
  timeout "${1:-420}" python3 -m benchmarks.profile_step --out "$OUT" \
    --providers "${PROVIDERS:-reference,fused,fused-compiled,fused-compiled:reduce-overhead,fused-compiled:max-autotune-no-cudagraphs}" \
    2>&1 | tee "$OUT/profile.log"
}
suite() {
  # pytest-benchmark writes its JSON only at the end: the timeout leaves time for that and the report
  timeout 540 python3 -m pytest -q "$@" --benchmark-json="$OUT/RESULTS.json" 2>&1 | tail -n 40 | tee "$OUT/bench.log"
  python3 -m benchmarks.report "$OUT/RESULTS.json" --markdown "$OUT/report.md" --png "$OUT/speedups.png" && cat "$OUT/report.md"
}
case "$what" in
  tests) tests ;;
  profile) profile 540 ;;
  check) tests; profile 240 ;;
  bench) suite benchmarks/ --ignore=benchmarks/bench_onnx.py "$@" ;;
  onnx) suite benchmarks/bench_onnx.py "$@" ;;
  *) echo "usage: gpu_session.sh tests|profile|check|bench|onnx [pytest args]"; exit 2 ;;
esac
