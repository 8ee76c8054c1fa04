#!/usr/bin/env bash
# GPU check (issue 20): one command on a CUDA machine with a fresh copy of the repo.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash benchmarks/gpu_check.sh [--dry-run] [--out FILE]

On one CUDA GPU, from the repository root's copy:
  1. install   spacejax with jax for CUDA (jax[cuda12] at setup.py's jax requirement), torch for the
               parity tests (the CPU build: they compare with transformers on the host) and pytest,
               into the active virtualenv or a new .venv-gpu
  2. tests     tests/test_model.py, tests/test_hf.py (parity with transformers) and
               tests/test_attention.py (every attention against the reference, and the cuDNN test with
               left padding that is skipped on CPU: it must pass here) on the GPU, float32 matmuls at
               full precision (JAX_DEFAULT_MATMUL_PRECISION=highest: the tests compare to 1e-5, and
               the GPU's default float32 matmul is TF32); the splash test under a 4-device mesh is
               deselected (one GPU; it runs on CPU in CI)
  3. measure   benchmarks/gpu_check.py on a ~1B Llama in bfloat16: train-step MFU, decode tokens/s
               against the HBM roofline, dot_product (cuDNN) against reference attention, left
               padding with cuDNN; it writes the GPU section of benchmarks/BENCHMARKS.md
Each part has a time limit (INSTALL_LIMIT 180 s, TESTS_LIMIT 110 s, MEASURE_LIMIT 180 s): under 8
minutes in all. A failed test is recorded in the section and makes the script exit non-zero.

  --dry-run    (or DRY_RUN=1) on the CPU: no install, the tests' command printed (and the cuDNN
               test checked to exist), the same measuring code at tiny sizes, the section written
               to FILE (default: a new temporary file), never to BENCHMARKS.md
  --out FILE   write the section into FILE instead
  -h, --help   this help

Environment: PYTHON (the interpreter; default python of the active virtualenv, else of .venv-gpu),
JAX_CUDA_EXTRA (default cuda12), INSTALL_LIMIT, TESTS_LIMIT, MEASURE_LIMIT (seconds).
EOF
}

DRY_RUN=${DRY_RUN:-0}
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
INSTALL_LIMIT=${INSTALL_LIMIT:-180}
TESTS_LIMIT=${TESTS_LIMIT:-110}
MEASURE_LIMIT=${MEASURE_LIMIT:-180}
TESTS=(tests/test_model.py tests/test_hf.py tests/test_attention.py)
DESELECT=(--deselect tests/test_attention.py::test_splash_under_a_mesh_runs_per_shard_and_equals_reference)
CUDNN_TEST=tests/test_attention.py::test_cudnn_with_left_padding_matches_reference_in_bfloat16
started=$SECONDS

# The requirement `NAME<op>VERSION` that setup.py lists for NAME, e.g. `jax>=0.7`.
setup_requirement() {
  local found
  found=$(grep -oE "\"$1(==|>=|~=|<=)[^\"]*\"" setup.py | head -n 1 | tr -d '"')
  [[ -n $found ]] || { echo "gpu_check.sh: setup.py lists no requirement for $1" >&2; exit 1; }
  echo "$found"
}

install() {
  if [[ -z ${PYTHON:-} && -z ${VIRTUAL_ENV:-} ]]; then
    python3 -m venv .venv-gpu
    PYTHON=.venv-gpu/bin/python
  fi
  PYTHON=${PYTHON:-python}
  local jax torch pytest
  jax=$(setup_requirement jax)
  torch=$(setup_requirement torch)
  pytest=$(setup_requirement pytest)
  echo "== install: spacejax, jax[${JAX_CUDA_EXTRA:-cuda12}]${jax#jax}, $torch (CPU build), $pytest"
  timeout "$INSTALL_LIMIT" "$PYTHON" -m pip install -q -e . "jax[${JAX_CUDA_EXTRA:-cuda12}]${jax#jax}" "$torch" \
    "$pytest" --extra-index-url https://download.pytorch.org/whl/cpu
  "$PYTHON" -c 'import jax, sys
jax.default_backend() == "gpu" or sys.exit(f"gpu_check.sh: jax sees no GPU, only {jax.devices()}")'
}

# Runs the tests; prints pytest's last line (its summary) on stdout, its output on stderr.
run_tests() {
  local log rc=0
  log=$(mktemp)
  JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$TESTS_LIMIT" \
    "$PYTHON" -m pytest -q -rA -p no:cacheprovider "${TESTS[@]}" "${DESELECT[@]}" >"$log" 2>&1 || rc=$?
  cat "$log" >&2
  if [[ $rc -ne 0 ]]; then
    echo "FAILED (pytest exit $rc): $(tail -n 1 "$log")"
  elif ! grep -q "PASSED $CUDNN_TEST" "$log"; then
    echo "FAILED: $CUDNN_TEST did not run (skipped?): $(tail -n 1 "$log")"
  else
    tail -n 1 "$log"
  fi
  rm -f "$log"
}

if [[ $DRY_RUN == 1 ]]; then
  PYTHON=${PYTHON:-python}
  export JAX_PLATFORMS=cpu
  # the dry run's figures mean nothing, so compile without LLVM optimisation (as tests/test_attention does)
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
  OUT=${OUT:-$(mktemp -t gpu_check.XXXXXX.md)}
  grep -q "^def ${CUDNN_TEST##*::}(" "${CUDNN_TEST%%::*}" || { echo "gpu_check.sh: $CUDNN_TEST is gone" >&2; exit 1; }
  echo "== dry run: would install jax[${JAX_CUDA_EXTRA:-cuda12}]$(j=$(setup_requirement jax); echo "${j#jax}")"
  echo "== dry run: would run: pytest -q -rA ${TESTS[*]} ${DESELECT[*]} (needing PASSED $CUDNN_TEST)"
  summary="not run (dry run)"
  measure=(--dry-run --repeats 1)
else
  install
  echo "== tests ($(( SECONDS - started )) s so far)"
  summary=$(run_tests)
  echo "tests: $summary"
  measure=()
fi

echo "== measure ($(( SECONDS - started )) s so far)"
command="bash benchmarks/gpu_check.sh"
[[ $DRY_RUN == 1 ]] && command+=" --dry-run"
[[ -n $OUT ]] && measure+=(--out "$OUT")
timeout "$MEASURE_LIMIT" "$PYTHON" benchmarks/gpu_check.py "${measure[@]}" --tests "$summary" --command "$command"
echo "== done in $(( SECONDS - started )) s${OUT:+; section written to $OUT}"
[[ $summary != FAILED* ]]
