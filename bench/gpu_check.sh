#!/usr/bin/env bash
# The job's GPU check, for a lent GPU machine (one H100 or H200, 16 cores: about 6 minutes, under 10 with the machine's start).
#
# Runs, on the first CUDA device (see bench/gpu_job.py for the details):
#   1. 50 shards x 1,000 ImageNet-sized synthetic JPEGs (ImageNet val's 50,000); decoding alone on all cores;
#   2. the actor's class (ShardProcessor, in-process: the machine has no Ray) with ViT-S/16, --targets topk:5,
#      --decode cpu|gpu x --precision float32|bf16, default batch (fills the GPU) and decode workers (all cores):
#      each start-up phase, images/s over the shards after a warm-up one (two at a time, as a Ray actor holds them),
#      GPU utilisation (nvidia-smi every 100 ms), the time for 50,000 images;
#   3. GPU-decoded against CPU-decoded maps on scikit-image's bundled photographs: relative error, Spearman;
#   4. tests/test_decode_pool.py on the GPU machine (its CPU tests; the flag test needs Ray and is deselected).
# and prints the Markdown to paste into BENCHMARKS.md ("## Job" section, "On a lent GPU"). Files land in $OUT.
#
# The GPU machine has torch, timm, torchvision, numpy, pyarrow, psutil, tqdm, scikit-image and pytest, but not
# zarr, obstore or braceexpand (which `import cdam_worker` needs). Carry them as wheels (Python 3.12 there). Once,
# here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#       zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 obstore==0.12.1 braceexpand==0.1.7
# Then the device tool's `run` with carry [".whl"], timeout_s 560 (the steps stop themselves by 540 s) and the command
#   bash bench/gpu_check.sh
# This script installs .whl/*.whl into /tmp/site itself and puts it on PYTHONPATH (bench/gpu_preamble.sh).

# shellcheck source=bench/gpu_preamble.sh
source "$(dirname "$0")/gpu_preamble.sh" gpu_check torch torchvision timm
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

failed=0
echo "== 1-3. bench/gpu_job.py"
timeout 450 python3 -m bench.gpu_job --output "$results/gpu_job.md" 2>"$results/gpu_job.log" || { failed=1; tail -n 30 "$results/gpu_job.log"; }

echo "== 4. tests/test_decode_pool.py"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_decode_pool.py -k "not flags" 2>&1 | tee "$results/pytest_decode_pool.txt" | tail -n 5 || failed=1

echo
echo "== For BENCHMARKS.md, '## Job', subsection 'On a lent GPU' (date: $(date -u +%Y-%m-%d))"
cat "$results/gpu_job.md" 2>/dev/null
exit $failed
