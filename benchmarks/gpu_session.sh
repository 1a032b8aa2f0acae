#!/usr/bin/env bash
# One lent-GPU session's checks, in one command (device time is short): the gpu-marked tests, then the
# real-size GRPO step figures of benchmarks/gpu_step.py. Run from the repository root on the GPU machine, with
# the packages that machine lacks carried as wheels in .whl/ (BENCHMARKS.md section 4 lists them). Logs go
# to $OUT (or ./gpu_session_out).
set -o pipefail
OUT=${OUT:-gpu_session_out}
mkdir -p "$OUT"
# this project too, as a user installs it (callbacks/ and datamodules/ install as gainrl_pl sub-packages)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade \
  --target /tmp/site $(compgen -G ".whl/*.whl") . || exit 1
export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, peft, lightning, bitsandbytes; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| lightning', lightning.__version__, '| bitsandbytes', bitsandbytes.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; } 2>&1 | tee "$OUT/versions.txt"
timeout "${PYTEST_S:-300}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_cli.py \
  tests/test_gpu_step_benchmark.py tests/test_evaluate.py 2>&1 | tee "$OUT/pytest_gpu.log"
timeout "${STEP_S:-220}" python3 benchmarks/gpu_step.py --steps "${STEPS:-1}" \
  --configs "${CONFIGS:-mixed_full,qlora,mixed_lora,bf16_full,bf16_lora}" --workdir /tmp/gpu_step 2>&1 | tee "$OUT/gpu_step.log"
