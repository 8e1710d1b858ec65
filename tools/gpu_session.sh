#!/usr/bin/env bash
# The GPU half of docs/PERFORMANCE.md's 7-8B measurements, as one command for a lent GPU machine
# (which allows one 10-minute command, and little device time in all): each step has its own time
# limit, writes its JSON and log under $OUT and never stops the next one.
#
#   bash tools/gpu_session.sh [STEPS]      STEPS: comma-separated, default tests,scale,infer
#     tests  pytest -m gpu tests/gpu: the CUDA paths against the CPU references (tiny models)
#     scale  bench_scale: one Bonsai iteration at 8B under 8 and 24 GB, export, accelerate, references
#     sweep  bench_scale: 8 and 12 GB iterations, then the planner sweep at each (--no-reference)
#     infer  bench_infer: parent vs 50% pruned (per-layer, per-layer --gqa equal, uniform), prefill, decode
#
# Packages missing there (bitsandbytes, gguf) travel unpacked in .whl/site, put on PYTHONPATH here.
# A dry run on a CPU: SHAPE=tiny DEVICE=cpu WORK="--masks 4 --samples 2 --seq-len 64" INFER="--batch 2
# --prefill-len 32 --prompt-len 8 --new-tokens 8" BONSAI_TEST_DEVICE=cpu OUT=/tmp/out bash tools/gpu_session.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/gpu-session-out}
mkdir -p "$OUT"
STEPS=${1:-tests,scale,infer}
SHAPE=${SHAPE:-llama3-8b}
DEVICE=${DEVICE:-cuda}
W=${BENCH_DIR:-/tmp/bonsai-bench}
WORK=${WORK:---masks 32 --samples 8 --seq-len 2048}
INFER=${INFER:---new-tokens 64}
[ -d .whl/site ] && export PYTHONPATH="$PWD/.whl/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u; nvidia-smi 2>&1 | head -15; df -h /tmp; free -g; nproc
  python3 -c "import torch, transformers, accelerate, safetensors, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'safetensors', safetensors.__version__, 'peft', peft.__version__)"
  python3 -c "import bitsandbytes, gguf; print('bitsandbytes', bitsandbytes.__version__)"
} > "$OUT/env.txt" 2>&1

step() { case ",$STEPS," in *",$1,"*) return 0 ;; esac; return 1; }
ran() { echo "[$1] rc=$2 after $(( $(date +%s) - $3 )) s"; }

if step tests; then
  t=$(date +%s)
  timeout 90 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
  ran tests $? "$t" | tee -a "$OUT/pytest.txt"; tail -4 "$OUT/pytest.txt"
fi
if step scale; then
  t=$(date +%s)
  # shellcheck disable=SC2086
  timeout 280 python3 tools/bench_scale.py --shape "$SHAPE" --device "$DEVICE" --work-dir "$W" --keep \
    --budgets 8GB,24GB $WORK --export --accelerate --deadline 190 > "$OUT/scale.json" 2> "$OUT/scale.log"
  ran scale $? "$t"; grep -v "%|" "$OUT/scale.log" | tail -4
  rm -rf "$W/export-$SHAPE" "$W/run-$SHAPE"
fi
if step sweep; then
  t=$(date +%s)
  # shellcheck disable=SC2086
  timeout 220 python3 tools/bench_scale.py --shape "$SHAPE" --device "$DEVICE" --work-dir "$W" --keep \
    --budgets 8GB,12GB $WORK --accelerate --sweep --sweep-per-order 1 --no-reference --no-paper-regression \
    --deadline 170 > "$OUT/sweep.json" 2> "$OUT/sweep.log"
  ran sweep $? "$t"; grep -v "%|" "$OUT/sweep.log" | tail -4
  rm -rf "$W/run-$SHAPE"
fi
if step infer; then
  t=$(date +%s)
  # shellcheck disable=SC2086
  timeout 170 python3 tools/bench_infer.py --shape "$SHAPE" --device "$DEVICE" --work-dir "$W" --sparsities 0.5 \
    --formats per-layer,per-layer-gqa-equal,uniform --trust-remote-code $INFER --deadline 110 \
    > "$OUT/infer.json" 2> "$OUT/infer.log"
  ran infer $? "$t"; grep -v "%|" "$OUT/infer.log" | tail -4
fi
exit 0
