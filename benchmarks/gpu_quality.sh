#!/usr/bin/env bash
# The quality study at scale on a GPU machine (docs/QUALITY.md), in parallel processes:
#   accuracy / retention / needle survival per task family (one process each), fidelity on natural text,
#   and needle survival per stage for block sizes and schedules (scorer_study.py).
#
#   SLIMPASS_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf OUT=results benchmarks/gpu_quality.sh [seconds]
#
# Needs the gguf package once (to convert the model into $SLIMPASS_CACHE). Each process stops after
# the given seconds (default 450): size the work to fit, a stopped eval writes nothing.
set -u
LIMIT=${1:-450}
OUT=${OUT:-quality_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 -c "from slimpass.eval import models; models.load()" || exit 1
VARIANTS=(--schedule 'paper_b32={"schedule": {"9": 0.5, "19": 0.25}, "block_size": 32}'
          --schedule 'late_b32={"schedule": {"15": 0.5, "19": 0.25}, "block_size": 32}')
for task in passkey niah_single niah_multikey niah_multivalue niah_multiquery variable_tracking common_words qa; do
    timeout "$LIMIT" python3 -m slimpass.cli eval --device cuda --lengths 512,1k --samples 17 --seeds 1,2,3 \
        --haystack repeat --quiet --tasks $task "${VARIANTS[@]}" --out "$OUT/eval_$task" > "$OUT/eval_$task.log" 2>&1 &
done
timeout "$LIMIT" python3 -m slimpass.cli eval --device cuda --tasks passkey --lengths 1k,2k --samples 1 --seeds 1,2,3 \
    --fidelity-samples 20 --quiet "${VARIANTS[@]}" --out "$OUT/fidelity" > "$OUT/fidelity.log" 2>&1 &
timeout "$LIMIT" python3 benchmarks/scorer_study.py --device cuda --lengths 1000,4000,2000 --samples 20 --seeds 1,2,3 \
    --tasks passkey:repeat,niah_single:natural,niah_multikey:natural,qa:natural,niah_multivalue:natural \
    --schedules 15:0.5,19:0.25 9:0.5,19:0.25 --scorers window_attention --block-sizes 16,32 \
    --out "$OUT/study_blocks.json" > "$OUT/study_blocks.log" 2>&1 &
wait
