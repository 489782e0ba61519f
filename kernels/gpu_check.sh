#!/usr/bin/env bash
# One prepared GPU run (issue 22): build the CUDA kernels, run every `gpu` test, run the kernels'
# tests under compute-sanitizer, then the benchmarks, writing everything into one folder.
#
#   bash kernels/gpu_check.sh [OUT_DIR]
#
# OUT_DIR defaults to $OUT (the device tool's result folder), else runs/gpu_check. It receives at
# most 8 files: summary.txt (one line per step with its status and seconds: read this first),
# env.txt (GPU, jax, nvcc, doctor), build.log, pytest_gpu.log, sanitizer.log, bench.log (every
# benchmark's output) and bench.json (every benchmark's bench.json, keyed by suite).
#
# Python packages the GPU image lacks travel as wheels in .whl/ (git-ignored; see the device
# tool's README): they are installed into /tmp/site first when present.
#
# Steps after the build keep going when one fails, so one failure does not cost the GPU minutes
# of the others; each has a time limit, and the benchmarks stop being started once
# GPU_CHECK_BUDGET_S (default 480) seconds have passed since the script began. Settings:
#   GPU_CHECK_BENCHES  benchmark suites in order (default: splat geometry flame insta gem synshot d3ga)
#   GPU_CHECK_ARCH     CUDA architectures to build for (default: 90, the H100/H200)
#   GPU_CHECK_ON_CPU=1 run the steps without a GPU (checks this script; the gpu tests then skip)
#
# GPU_CHECK_MODE=goals (a second loan, once the check has passed) replaces the tests, the
# sanitizer and the benchmarks by the GPU goals of issues 17 and 18, still after the build:
#   1. INSTA's paper variant trained for GPU_GOALS_INSTA_S (default 300) seconds, then stopped
#      by SIGTERM, which writes training_curve.json / .png (held-out ray PSNR against seconds;
#      goal: its plateau in under 5 minutes); on a synthetic video of GPU_GOALS_INSTA_FRAMES
#      (default 600) 512^2 frames, the last GPU_GOALS_INSTA_HOLDOUT (100) held out, since the
#      paper's 1500 would take minutes to generate. GPU_GOALS_INSTA_ARGS appends flags (e.g. a
#      batch to try).
#   2. configs/bench.py:insta on the paper variant: its training step and the 512^2 render
#      (goal: >= 20 frames/s); 3. configs/bench.py:gem (goal: GEM >= 5x the Net's frames/s).
#   Files: summary.txt, env.txt, build.log, goals.log, training_curve.json / .png, bench.json.
#   GPU_GOALS_INSTA_CONFIG replaces the INSTA config; GPU_GOALS_INSTA_BENCH_ARGS and
#   GPU_GOALS_GEM_BENCH_ARGS add flags to the benchmarks (how the mode is checked on a CPU).
# Exit status: 0 when every step passed, 1 when a step failed, 2 when no GPU is visible to JAX
# (and GPU_CHECK_ON_CPU is not set), 3 when the build failed.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
work=runs/gpu_check_work
rm -rf "$work" && mkdir -p "$work"
: > "$out/summary.txt"
failed=0

say() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*" | tee -a "$out/summary.txt"; }

# step NAME LIMIT_S LOG CMD...: runs CMD with a time limit, appending its output to LOG.
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$(date +%s)
  echo "===== $name: $*" >> "$log"
  timeout --signal=TERM --kill-after=20 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local status=passed
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT after ${limit}s"; elif [ "$rc" -ne 0 ]; then status="FAILED (exit $rc)"; fi
  [ "$status" = passed ] || failed=1
  say "$name: $status in $(( $(date +%s) - t0 ))s (log: $(basename "$log"))"
  return "$rc"
}

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

{
  echo "date: $(date -u)"; echo "host: $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not available"
  nvcc --version 2>&1 | tail -2 || echo "nvcc: not available"
  python3 -c "import sys, jax; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())" 2>&1
} > "$out/env.txt"

if ! python3 -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>> "$out/env.txt"; then
  if [ "${GPU_CHECK_ON_CPU:-0}" != 1 ]; then
    say "no CUDA GPU is visible to JAX (jax.default_backend() is not 'gpu'); see env.txt. Nothing was run."
    exit 2
  fi
  say "no GPU: GPU_CHECK_ON_CPU=1, so the steps run on the CPU (the gpu tests skip)"
fi

# 1. Build: CPU and CUDA handlers into dhjax/_kernels (the loader looks there first).
step build 420 "$out/build.log" bash kernels/build_inplace.sh -DDHJAX_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${GPU_CHECK_ARCH:-90}" \
  || { say "the build failed: see build.log"; exit 3; }
python3 -m dhjax.doctor >> "$out/env.txt" 2>&1

# 2. Every gpu test. DHJAX_REQUIRE_KERNELS=1: a CUDA library that is missing or fails to load is
#    a failure, not a skip.
export DHJAX_REQUIRE_KERNELS=1

# bench_json OUT_FILE: every bench.json under $work, keyed by suite, into one file.
bench_json() {
  python3 - "$work" "$1" <<'EOF'
import json, pathlib, sys
found = {p.parent.name.removeprefix("bench_"): json.loads(p.read_text())
         for p in sorted(pathlib.Path(sys.argv[1]).glob("bench_*/bench.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(found, indent=1))
print(f"bench.json: {len(found)} suites")
EOF
}

if [ "${GPU_CHECK_MODE:-check}" = goals ]; then
  insta_cfg=${GPU_GOALS_INSTA_CONFIG:-configs/insta.py:paper}
  f0=$failed
  # shellcheck disable=SC2086
  step "INSTA plateau ($insta_cfg, ${GPU_GOALS_INSTA_S:-300}s then SIGTERM)" "${GPU_GOALS_INSTA_S:-300}" "$out/goals.log" \
    python3 -m experiments.insta "--config=$insta_cfg" --config.train.eval_every=250 \
    "--config.data.synthetic.video.n_frames=${GPU_GOALS_INSTA_FRAMES:-600}" "--config.data.holdout=${GPU_GOALS_INSTA_HOLDOUT:-100}" \
    "--workdir=$work/insta_plateau" ${GPU_GOALS_INSTA_ARGS:-}
  if [ -f "$work/insta_plateau/training_curve.json" ]; then
    failed=$f0        # stopped by the time limit, as planned: the curve is the result
    cp "$work/insta_plateau/training_curve.json" "$work/insta_plateau/training_curve.png" "$out/" 2>/dev/null
    say "INSTA plateau: $(grep -ho 'training curve.*' "$out/goals.log" | tail -1)"
  else
    failed=1; say "INSTA plateau: no training_curve.json (see goals.log)"
  fi
  # shellcheck disable=SC2086
  step "bench insta ($insta_cfg)" 240 "$out/goals.log" python3 -m experiments.bench --config=configs/bench.py:insta \
    "--config.insta.config=$insta_cfg" "--workdir=$work/bench_insta" ${GPU_GOALS_INSTA_BENCH_ARGS:-}
  # shellcheck disable=SC2086
  step "bench gem" 240 "$out/goals.log" python3 -m experiments.bench --config=configs/bench.py:gem \
    "--workdir=$work/bench_gem" ${GPU_GOALS_GEM_BENCH_ARGS:-}
  bench_json "$out/bench.json"
  say "done (goals): $([ "$failed" = 0 ] && echo 'every step passed' || echo 'a step FAILED: see above') in $(( $(date +%s) - start ))s"
  exit "$failed"
fi
step "pytest -m gpu" 300 "$out/pytest_gpu.log" python3 -m pytest -m gpu -q -rs -p no:cacheprovider --durations=15 \
  --continue-on-collection-errors tests

# 3. compute-sanitizer over the kernels' tests: memcheck on every CUDA kernel test except the big
#    splat parametrisations, racecheck on the splat forward/backward of one mixed scene. XLA's
#    platform allocator, so that an access past one buffer is not hidden inside XLA's pool.
if command -v compute-sanitizer > /dev/null; then
  sanitize() {
    XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false \
      compute-sanitizer --error-exitcode 9 --print-limit 20 "$@"
  }
  step "compute-sanitizer memcheck" 240 "$out/sanitizer.log" sanitize --tool memcheck \
    python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_ops_bvh.py tests/test_ops_hashgrid.py \
    tests/test_ops_raymarch.py "tests/test_ops_splat_cuda.py::test_values_match_reference[mixed]" \
    "tests/test_ops_splat_cuda.py::test_gradients_match_reference[mixed]" \
    "tests/test_ops_splat_cuda.py::test_gradients_match_reference[one_tile]" \
    tests/test_ops_splat_cuda.py::test_empty_scenes "tests/test_ops_splat_cuda.py::test_deterministic_backward[mixed]"
  step "compute-sanitizer racecheck" 150 "$out/sanitizer.log" sanitize --tool racecheck \
    python3 -m pytest -m gpu -q -p no:cacheprovider "tests/test_ops_splat_cuda.py::test_gradients_match_reference[mixed]"
else
  say "compute-sanitizer: not on PATH, skipped"
fi

# 4. Benchmarks, most important first, while the budget lasts.
budget=${GPU_CHECK_BUDGET_S:-480}
for suite in ${GPU_CHECK_BENCHES:-splat geometry flame insta gem synshot d3ga}; do
  if [ $(( $(date +%s) - start )) -ge "$budget" ]; then
    say "bench $suite: not started (GPU_CHECK_BUDGET_S=$budget s spent)"
    continue
  fi
  step "bench $suite" 240 "$out/bench.log" python3 -m experiments.bench "--config=configs/bench.py:$suite" "--workdir=$work/bench_$suite"
done
bench_json "$out/bench.json"

say "done: $([ "$failed" = 0 ] && echo 'every step passed' || echo 'a step FAILED: see above') in $(( $(date +%s) - start ))s"
exit "$failed"
