#!/usr/bin/env bash
# Re-make the adapters shipped with the embedded digits model (src/diffblend/zoo/adapters):
# one LoRA adapter per reward and three MORL oracles for the conflicting pair
# (jpeg_compressibility, legibility), each with DPOK (`diffblend finetune`), fixed seeds.
#
#   bash scripts/make_adapters.sh            # all, one after the other (about 2-3 minutes each on CPU)
#   bash scripts/make_adapters.sh boldness   # only the adapters whose name contains "boldness"
#
# Runs (config, metrics, checkpoints) go to $RUNS (default runs/adapters, git-ignored); a run that is
# killed continues where it stopped when the script is started again (--resume). One torch thread per
# run: the models are tiny, and on a shared machine more threads are slower.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-runs/adapters}
OUT=${OUT:-src/diffblend/zoo/adapters}
ONLY=${1:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# Shared settings: 30 epochs of 16 rollouts (4 prompts x 4 images) with 20 DDIM steps (eta 1) and
# CFG 2 (the generation defaults); one AdamW step per epoch on all 20 transitions of every rollout.
COMMON=(--epochs 30 --prompts-per-epoch 4 --samples-per-prompt 4 --minibatch-size 16 --steps 20
        --guidance-scale 2.0 --rank 4 --lr 1e-2 --seed 0 --checkpoint-every 5 --no-progress
        --monitor jpeg_compressibility,legibility,boldness)

# alpha = 0.05 for every adapter: DB-MPA blends adapters aligned at one common alpha (Lemma 2), and
# the MORL oracles it is compared with must share it. For the compressibility adapter on this model,
# alpha = 0.03 left 85 % of the digits legible and alpha = 0.05 99 % (python -m diffblend.train.evaluate,
# 8 images per digit); alpha = 0 and 0.01 (on a first version of the base) erased the strokes within
# 15 epochs: blank images of 0.38 kB, the reward hacking seen in the prototype.

# name | reward | alpha (--kl)
ADAPTERS=(
  "jpeg_compressibility|jpeg_compressibility|0.05"
  "legibility|legibility|0.05"
  "boldness|boldness|0.05"
  "morl_w0_25|jpeg_compressibility=0.25,legibility=0.75|0.05"
  "morl_w0_5|jpeg_compressibility=0.5,legibility=0.5|0.05"
  "morl_w0_75|jpeg_compressibility=0.75,legibility=0.25|0.05"
)

# shellcheck source=scripts/_finetune_adapters.sh
source scripts/_finetune_adapters.sh
finetune_adapters

# Paired evaluation of every shipped adapter against the base: 16 images per digit, the same noise
# for every model; every reward, legibility accuracy, and the path KL to the base.
args=()
for entry in "${ADAPTERS[@]}"; do
  IFS='|' read -r name _ _ <<<"$entry"
  [[ -f "$OUT/$name.safetensors" ]] && args+=(--adapter "$name=$OUT/$name.safetensors")
done
python -m diffblend.train.evaluate --model digits --rewards jpeg_compressibility,legibility,boldness "${args[@]}" \
  --per-prompt 16 --seed 1234 --guidance-scale 2.0 -o "$OUT/evaluation.json"
