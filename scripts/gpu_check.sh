#!/usr/bin/env bash
# The one prepared device run for the GPU work (issue 14): the CUDA tests, the Triton kernel tests compiled
# for the GPU, and the GPU benchmark, each under its own timeout, logs under $OUT.
#
# Here, before the run (the device has torch, triton, transformers and peft, but not all of loraplex's
# other dependencies; they travel as wheels, /work/.library/device/README.md):
#   scripts/gpu_check.sh --wheels        # downloads them into .whl/ (ignored by git)
# Then one device call, carrying .whl:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=590)
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} == --wheels ]]; then
    grep -qxF /.whl/ .git/info/exclude || echo /.whl/ >>.git/info/exclude
    # The device's Python is 3.12; these are what `import loraplex` needs beyond the device's own packages.
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 \
        -d .whl platformdirs==4.14.9 boto3==1.44.5 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0 \
        llguidance==1.9.1 gguf==0.19.0
    exit
fi

OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 LORAPLEX_HOME=/tmp/loraplex-home
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee "$OUT/versions.txt"

# 1. CUDA-only tests and the Triton kernel tests, compiled for the GPU (-p no:cacheprovider: a read-only tree is fine).
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not slow" \
    tests/gpu tests/lora/test_triton_ops.py tests/model/test_triton_attention.py tests/model/test_triton_decoder.py \
    tests/model/test_cuda_graphs.py tests/model/test_triton_quant.py \
    2>&1 | tee "$OUT/pytest-gpu.txt"
# 2. The benchmark (model and adapters built by the script; about 5 minutes on an H200).
timeout 320 python3 -m loraplex.bench.gpu 2>&1 | tee "$OUT/bench-gpu.txt"
