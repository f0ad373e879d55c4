#!/usr/bin/env bash
# GPU check (benchmarks/gpu_check.py): training img/s of the CIFAR-10 config-F network (ours under Lightning, a plain
# PyTorch loop, EDM's step; fp32/bf16, eager/compiled), peak memory, sampling img/s per solver at NFE 10 and the cost
# of a 10k-sample Inception FID evaluation. Under 8 minutes on one GPU; needs no network.
#
#   bash benchmarks/gpu_check.sh [--inception-weights weights-inception-2015-12-05-6726825d.pth] [gpu_check.py options]
#
# On a GPU machine with torch, Lightning and torchmetrics installed, it installs the project with --no-deps and the
# few missing pure-Python packages from benchmarks/wheels/ (never from the network). Fill that folder beforehand, on
# a machine with network access and the same Python version:
#   pip download -d benchmarks/wheels omegaconf antlr4-python3-runtime torch-fidelity
# Without --inception-weights the Inception network has random weights: the FID cost is real, the score is not.
# Results: the table on stdout, JSON in benchmarks/results/gpu_check.json (override with --out).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import evodiff_pl, omegaconf, torch_fidelity" 2>/dev/null; then
    if [ -d benchmarks/wheels ]; then
        python -m pip install -q --no-index --find-links benchmarks/wheels omegaconf torch-fidelity
    fi
    python -m pip install -q --no-deps --no-build-isolation -e .
fi
python - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
PY
exec timeout 480 python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json "$@"
