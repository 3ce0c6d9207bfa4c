#!/usr/bin/env bash
# The one check a CUDA machine runs for t0s1's vLLM plugin (docs/vllm.md): greedy exactness against
# t0s1's transformers engine, on vLLM's default model runner (V2 on GPUs) and on the V1 runner, then
# the speed figures of bench/vllm.py. Run from the repository root:
#
#     bash bench/gpu_check.sh            # about 10-15 minutes on one GPU
#
# It builds its own virtual environment (.venv-gpu) with the CUDA build of vLLM from PyPI and this
# checkout installed editable (so the plugin's entry points are registered), and leaves it there.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no CUDA GPU found" >&2; exit 2; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[vllm]" "pytest>=8"
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import entry_points, version
print("vllm", version("vllm"), "transformers", version("transformers"), "torch", version("torch"))
names = [e.name for e in entry_points(group="vllm.logits_processors")]
assert "t0s1_budget_forcing" in names, f"the plugin's entry point is not registered: {names}"
EOF

export VLLM_CPU_KVCACHE_SPACE=1  # ignored on CUDA
status=0
for runner in default 0; do
  if [ "$runner" = default ]; then unset VLLM_USE_V2_MODEL_RUNNER; label="default model runner"
  else export VLLM_USE_V2_MODEL_RUNNER=0; label="V1 model runner"; fi
  echo "== exactness and the API, $label"
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/vllm/test_vllm_serve.py || status=1
done
unset VLLM_USE_V2_MODEL_RUNNER

echo "== speed (bench/vllm.py)"
"$VENV/bin/python" bench/vllm.py --requests 32 --dtype float32 || status=1
exit $status
