#!/usr/bin/env bash
# Prove the asv suite is not broken -- never run the whole suite here.
#   1. asv check: every benchmark module imports and every benchmark has the
#      right signature for its params;
#   2. one quick benchmark: one step of Adam on 1000 float32 elements, on the
#      numpy and numba backends (numba is skipped, not failed, where it is not
#      installed), through asv's own runner.
# Usage: .ci/asv_check.sh [python]   (default: python on PATH; fastopt and asv installed in it)
# Runs on the existing environment (--python=same); writes nothing into the
# repository but asv_bench/results, which .gitignore ignores (--quick results are not saved).
set -euo pipefail
PY="${1:-python}"
cd "$(dirname "$0")/../asv_bench"
# asv wants a machine description before it runs anything; on a fresh runner make one
# (an existing ~/.asv-machine.json is kept: asv machine --yes only adds this machine's entry)
"$PY" -m asv machine --yes >/dev/null
"$PY" -m asv check --python=same
# (the result table lists every combination of the class; the unselected ones, n/a, are dropped)
"$PY" -m asv run --python=same --quick --show-stderr \
    --bench "bench_step\.Step\.time_step\('adam', '(numpy|numba)', 'float32', 1000\)" \
    | grep -v ' n/a '
