#!/usr/bin/env bash
# GPU checks for a session lent a CUDA GPU (about 6-8 minutes): the device name, the `gpu` tests
# (every device path on CUDA, reduced precision against fp32), then the GPU benchmarks: a plate
# through the API (plate engine alone, today's route, direct loop, Cellpose's eval) and training
# against Cellpose's train_seg on the GPU. Needs a CUDA build of torch; prints numbers, changes nothing.
#   scripts/gpu_check.sh            # all of it
#   FIELDS=32 scripts/gpu_check.sh  # a smaller plate
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" PYTHONUNBUFFERED=1
FIELDS="${FIELDS:-96}"
status=0

echo "== device"
python3 - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), f"no CUDA device visible to torch {torch.__version__}"
from app.science.device import default_precision
device = torch.device("cuda", 0)
props = torch.cuda.get_device_properties(device)
print(f"{torch.cuda.get_device_name(device)}: {props.total_memory / 2**30:.0f} GiB, capability "
      f"{props.major}.{props.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
      f"training auto precision {default_precision(device, 'training')}")
PY

echo "== gpu tests"
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/science || status=1

echo "== precision: bf16 vs fp32 on real DSB2018 fields (masks F1, speed)"
DATA="${DATA:-shared/data/dsb2018_fluo}"
[ -d "$DATA" ] || DATA=/work/shared/data/dsb2018_fluo
timeout 60 python3 -m app.cli bench precision --device cuda --data "$DATA" || status=1

echo "== plate: ${FIELDS} fields x 4 channels x 512^2 through the API on cuda (embedded database and broker)"
timeout 230 python3 -m app.cli bench plate --fields "$FIELDS" --device cuda || status=1

echo "== training: our loop (fp32 and auto precision) vs Cellpose's train_seg on cuda"
timeout 60 python3 -m app.cli bench training --device cuda --epochs 3 --no-memory || status=1

exit $status
