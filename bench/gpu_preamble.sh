# Sourced by the GPU check scripts (gpu_check.sh, gpu_engine_check.sh, gpu_evaluate.sh), never run:
#   source "$(dirname "$0")/gpu_preamble.sh" NAME MODULE...
# Goes to the repository root, sets $results to $OUT (or /tmp/NAME) and creates it, installs the carried
# .whl/*.whl into /tmp/site and puts it on PYTHONPATH, and prints the CUDA device and each MODULE's version
# (in that order; torch first). Exits the calling script with status 1 if any of that fails or CUDA is not usable.

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
results="${OUT:-/tmp/$1}"
mkdir -p "$results"
export PYTHONUNBUFFERED=1

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import importlib, sys; modules = [importlib.import_module(name) for name in sys.argv[1:]]; import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device', torch.cuda.get_device_name(), *(f'{module.__name__} {module.__version__}' for module in modules))" "${@:2}" || exit 1
