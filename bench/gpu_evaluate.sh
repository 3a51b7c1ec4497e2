#!/usr/bin/env bash
# `cdam evaluate`'s GPU check, for a lent GPU machine (one H100/H200: an estimated 3 minutes; each step stops itself).
# Prepared, not run yet: no GPU was lent to the session that built the evaluation methods (2026-12-02).
#
# Runs, on the first CUDA device:
#   1. the estimators' tests against their literal implementations, on this machine's CPU code path:
#      pytest -q tests/test_evaluate.py -k "definitions or authors or literal or ablation or measures or ssim"
#   2. bench/bench_evaluate.py on ViT-S/16 at 224 px, 64 images per call, every method (--device cuda): seconds per
#      image of each method's maps (K = 2 classes) and of the deletion and insertion curves, the 1,000-image
#      extrapolation, in the Markdown of BENCHMARKS.md's "## Evaluate" section (written to $OUT/evaluate.md)
# and prints, at the end, the lines to paste into BENCHMARKS.md ("## Evaluate", subsection "On a lent GPU").
#
# The GPU machine has torch, timm, numpy, pyarrow, psutil, scipy and pytest, but not zarr, obstore or braceexpand
# (which `import cdam_worker` needs). Carry them as wheels (Python 3.12 there). Once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#       zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 obstore==0.12.1 braceexpand==0.1.7 captum==0.9.0
# Then the device tool's `run` with carry [".whl"], timeout_s 400 (the steps stop themselves by 360 s) and the command
#   bash bench/gpu_evaluate.sh
# This script installs .whl/*.whl into /tmp/site itself and puts it on PYTHONPATH (bench/gpu_preamble.sh).

# shellcheck source=bench/gpu_preamble.sh
source "$(dirname "$0")/gpu_preamble.sh" gpu_evaluate torch timm
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

failed=0
echo "== 1. the estimators' tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_evaluate.py -k "definitions or authors or literal or ablation or measures or ssim" 2>&1 \
    | tee "$results/pytest_evaluate.txt" | tail -n 5 || failed=1

echo "== 2. bench/bench_evaluate.py --device cuda"
timeout 240 python3 -m bench.bench_evaluate --device cuda --images 64 --report "$results/evaluate.md" 2>"$results/bench_evaluate.log" \
    || { failed=1; tail -n 30 "$results/bench_evaluate.log"; }

echo
echo "== For BENCHMARKS.md, '## Evaluate', subsection 'On a lent GPU' (date: $(date -u +%Y-%m-%d))"
cat "$results/evaluate.md" 2>/dev/null
exit $failed
