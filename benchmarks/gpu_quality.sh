#!/usr/bin/env bash
# The scorer/schedule study at scale on a GPU machine (docs/QUALITY.md): needle survival per pruning
# stage (benchmarks/scorer_study.py, the reference loop) for scorers, block sizes and schedules, one
# process per configuration group, 3 seeds x 20 prompts a cell.
#
#   SLIMPASS_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf OUT=results benchmarks/gpu_quality.sh [seconds]
#
# Needs the gguf package once (to convert the model into $SLIMPASS_CACHE). Each process stops after
# the given seconds (default 450); its log has every finished cell, its JSON only a finished run.
# Not here: accuracy with `slimpass eval`, whose pruned runs go through `generate`, which transformers
# 5.17 (the GPU image's) does not let us prune (see README, Limitations); run it with transformers >= 5.23.
set -u
LIMIT=${1:-450}
OUT=${OUT:-quality_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
python3 -c "from slimpass.eval import models; models.load()" || exit 1
TASKS=passkey:repeat,niah_single:natural,niah_multikey:natural,qa:natural,niah_multivalue:natural,niah_multiquery:natural,variable_tracking:natural
STUDY="benchmarks/scorer_study.py --device cuda --lengths 1000,2000,4000 --samples 20 --seeds 1,2,3 --tasks $TASKS"
timeout "$LIMIT" python3 $STUDY --schedules 15:0.5,19:0.25 --scorers window_attention --block-sizes 16,32,64 \
    --out "$OUT/study_late.json" > "$OUT/study_late.log" 2>&1 &
timeout "$LIMIT" python3 $STUDY --schedules 9:0.5,19:0.25 --scorers window_attention --block-sizes 16,32,64 \
    --out "$OUT/study_paper_layers.json" > "$OUT/study_paper_layers.log" 2>&1 &
timeout "$LIMIT" python3 $STUDY --schedules 9:0.5,19:0.25 --scorers tokenunit,window_attention_w16_p0 \
    --block-sizes 64 --out "$OUT/study_baselines.json" > "$OUT/study_baselines.log" 2>&1 &
wait
