#!/usr/bin/env bash
# Item 5 of issue 12: a >= 4k-token real answer memorized through the CLI, per objective.
# Resumable: a finished objective (summary.json + eval report) is skipped; a killed training
# run resumes from its last checkpoint (--checkpoint-every). Run from the repository root:
#   nohup bash benchmarks/results/long_answer_cli_runs.sh 4096 > runs/item5/log.txt 2>&1 &
set -u
LEN=${1:-4096}
PY=${PY:-/work/main/.venv/bin/python}
export PYTHONPATH=$PWD
ROOT=runs/item5
DATA=$ROOT/stress_$LEN.jsonl
# The data: the stress test at rho = 0 (the stdlib docstrings, no random tokens), LEN tokens.
if [ ! -f "$DATA" ]; then
  $PY -c "
from transformers import AutoTokenizer
from fastmem.models import smollm2_gguf_path
from fastmem.data import stress_test, save_jsonl
p = smollm2_gguf_path()
tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
save_jsonl([stress_test(tok, $LEN, 0.0, seed=42, max_length=8192)], '$DATA')"
fi
# Greedy decoding is left to `fastmem eval` (one decode per run, not two).
printf 'verify_greedy = false\n' > $ROOT/no_verify.toml
for spec in "ot:--threshold 0.3:${OT_STEPS:-200}" "sft::${SFT_STEPS:-200}" "sw::${SW_STEPS:-200}"; do
  IFS=: read -r obj extra steps <<< "$spec"
  dir=$ROOT/$LEN-$obj
  logs=$ROOT/logs/$LEN-$obj  # beside the run, never inside it (fastmem refuses a non-empty --out)
  mkdir -p $ROOT/logs
  if [ ! -f $dir/summary.json ]; then
    echo "[$(date +%H:%M:%S)] train $obj ($LEN tokens, budget $steps steps)"
    /usr/bin/time -v $PY -m fastmem train --data $DATA --out $dir --config $ROOT/no_verify.toml \
      --objective $obj $extra --rank ${RANK:-16} --alpha ${ALPHA:-32} --layers ${LAYERS:-24,25,26,27,28,29} \
      --modules ${MODULES:-q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj} --dropout 0 --lr ${LR:-1e-2} --max-steps $steps \
      --checkpoint-every 10 --no-progress > $logs.train_stdout.txt 2> $logs.train_time.txt
    echo "  train exit $?: $(tail -1 $logs.train_stdout.txt)"
  fi
  if [ -f $dir/summary.json ] && [ ! -f $dir/eval/report.json ]; then
    echo "[$(date +%H:%M:%S)] eval $obj"
    /usr/bin/time -v $PY -m fastmem eval --data $DATA --adapter $dir/adapter --out $dir/eval --grids 1 \
      --metrics $dir/metrics.jsonl > $logs.eval_stdout.txt 2> $logs.eval_time.txt
    echo "  eval exit $?: $(tail -3 $logs.eval_stdout.txt)"
  fi
done
echo "[$(date +%H:%M:%S)] done"
