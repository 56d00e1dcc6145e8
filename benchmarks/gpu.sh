#!/usr/bin/env bash
# Every benchmark on a CUDA GPU, unchanged: ResNet-50 at batch 64 under bf16 autocast for the
# penalty and spectral-norm step overhead, the MLP for dropout, then transform growth and the
# meta-device audit. Prints the machine first. Run from the repository root:
#     bash benchmarks/gpu.sh            # about 5 minutes on an H100
#     bash benchmarks/gpu.sh --quick    # a smoke run
# Needs torch with CUDA, networkx and click importable (transformers for meta_audit.py);
# regfx itself is used from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
status=0
for script in penalty spectral dropout; do
    $PY "benchmarks/$script.py" --device cuda "$@" || status=1
done
$PY benchmarks/transform.py --quick || status=1
$PY benchmarks/meta_audit.py "$@" || status=1
exit $status
