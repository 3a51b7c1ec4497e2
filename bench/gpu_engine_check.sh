#!/usr/bin/env bash
# The engine's GPU check, for a lent GPU machine (one H100: an estimated 3 minutes; each step stops itself in time).
#
# Runs, on the first CUDA device:
#   1. the CUDA engine tests: pytest -q tests/test_engine.py -k "cuda or precision"
#   2. bench_engine on ViT-S/16, batch 64 (the H100 run of 2026-11-27 again): Captum in exact float32 and its
#      agreement check (limit 1e-4), Smooth CDAM m=50 / vanilla in float32 and with precision=bf16
#   3. the Smooth ratios at float32 and bf16 for ViT-S/16 at batch 256 and ViT-S/8 at batch 64
# and prints, at the end, the lines to paste into BENCHMARKS.md ("Measured on a lent H100" section).
# The full bench sections and the test log are written to $OUT (or /tmp/gpu_engine_check).
#
# The GPU machine has torch, timm, numpy, pyarrow, psutil and pytest, but not zarr, obstore or captum (which
# `import cdam_worker` and the bench need). Carry them as wheels (Python 3.12 there). Once, here, in the
# repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#       zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 obstore==0.12.1 \
#       braceexpand==0.1.7 captum==0.9.0
# (15 MiB; their other needs, numpy, packaging, typing-extensions, pyyaml, matplotlib, tqdm, are there.)
# Then the device tool's `run` with carry [".whl"], timeout_s 500 (the steps stop themselves by 460 s) and the command
#   bash bench/gpu_engine_check.sh
# This script installs .whl/*.whl into /tmp/site itself and puts it on PYTHONPATH (bench/gpu_preamble.sh).

# shellcheck source=bench/gpu_preamble.sh
source "$(dirname "$0")/gpu_preamble.sh" gpu_engine_check torch timm

failed=0
echo "== 1. CUDA engine tests"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k "cuda or precision" 2>&1 | tee "$results/pytest_engine_cuda.txt" || failed=1

# name, then bench_engine arguments
runs=(
    "vit_s16_b64|--batch 64"
    "vit_s16_b256|--batch 256 --repeats 5"
    "vit_s8_b64|--model vit_small_patch8_224 --batch 64 --repeats 5"
)
for run in "${runs[@]}"; do
    name="${run%%|*}"
    echo "== bench_engine $name"
    # shellcheck disable=SC2086  # the arguments are meant to split
    timeout 120 python3 -m bench.bench_engine --device cuda --autograd-all skip ${run#*|} --output "$results/engine_$name.md" \
        >/dev/null 2>"$results/engine_$name.log" || { failed=1; tail -n 20 "$results/engine_$name.log"; }
done

echo
echo "== For BENCHMARKS.md, section 'Measured on a lent H100' (date: $(date -u +%Y-%m-%d))"
for run in "${runs[@]}"; do
    name="${run%%|*}"
    file="$results/engine_$name.md"
    [ -f "$file" ] || continue
    echo
    echo "$name: $(grep -m1 '^- Command:' "$file")"
    grep -E '^\| (Smooth CDAM|CDAM, closed form(, bf16 trunk)? \| 1 \|)' "$file"
    grep -E '^- (Closed form vs Captum|Smooth CDAM m=|What moves the Smooth maps)' "$file"
done
echo
echo "Full sections: $results/engine_*.md; tests: $results/pytest_engine_cuda.txt"
exit "$failed"
