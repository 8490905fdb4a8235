#!/usr/bin/env bash
# Re-make the adapters shipped with the colour default model (src/diffblend/zoo/colour_adapters):
# the reward calibration of the base model, one LoRA adapter per reward of the demo pair
# (colourfulness, jpeg_compressibility) and three MORL oracles on that pair, each with DPOK
# (`diffblend finetune`), fixed seeds; then the manifest.
#
#   bash scripts/make_colour_adapters.sh                 # all, one after the other
#   bash scripts/make_colour_adapters.sh colourfulness   # only the adapters whose name contains it
#   bash scripts/make_colour_adapters.sh manifest        # only (re)write manifest.json
#
# Runs (config, metrics, checkpoints) go to $RUNS (default runs/colour_adapters, git-ignored); a run that is
# killed continues where it stopped when the script is started again (--resume). Two instances with
# different filters can run at once (one core each) once calibration.json exists.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-runs/colour_adapters}
OUT=${OUT:-src/diffblend/zoo/colour_adapters}
ONLY=${1:-}
EPOCHS=${EPOCHS:-24}  # the shipped adapters: 24
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PROMPTS=$(python -c "from diffblend.zoo.colour.data import DEFAULT_PROMPTS; print(','.join(DEFAULT_PROMPTS))")
REWARDS=colourfulness,jpeg_compressibility,prompt_alignment
mkdir -p "$RUNS" "$OUT"

# The base model's reward statistics on its default prompts (20 images each, CFG 3): adapters train on
# (r - mean) / sd, so one unit of every reward is one sd of the base's images and w means the same for both.
if [[ ! -f "$OUT/calibration.json" ]]; then
  diffblend calibrate --model colour --rewards "$REWARDS" --prompts "$PROMPTS" --num-images 20 --steps 20 \
    --guidance-scale 3.0 --seed 1000 -o "$OUT/calibration.json"
fi

# 16 rollouts per epoch (4 prompts x 4 images), 20 DDIM steps (eta 1), CFG 3 (the colour model's default),
# one AdamW step per epoch on all transitions; alpha = 0.05 for every adapter (DB-MPA blends adapters
# aligned at one common alpha; the MORL oracles must share it). prompt_alignment is monitored to see
# reward hacking (an adapter that repaints the scene against its prompt).
COMMON=(--model colour --prompts "$PROMPTS" --calibration "$OUT/calibration.json" --epochs "$EPOCHS"
        --prompts-per-epoch 4 --samples-per-prompt 4 --minibatch-size 16 --steps 20 --guidance-scale 3.0
        --rank 4 --lr 1e-2 --seed 0 --checkpoint-every 5 --no-progress --monitor "$REWARDS")

# name | reward | alpha (--kl)
ADAPTERS=(
  "colourfulness|colourfulness|0.05"
  "jpeg_compressibility|jpeg_compressibility|0.05"
  "morl_w0_5|colourfulness=0.5,jpeg_compressibility=0.5|0.05"
  "morl_w0_25|colourfulness=0.75,jpeg_compressibility=0.25|0.05"
  "morl_w0_75|colourfulness=0.25,jpeg_compressibility=0.75|0.05"
)

if [[ "$ONLY" != "manifest" ]]; then
  # shellcheck source=scripts/_finetune_adapters.sh
  source scripts/_finetune_adapters.sh
  finetune_adapters
fi

# manifest.json: what each shipped file is (the oracles' w is over the pair, w = the jpeg_compressibility share).
python - "$OUT" "${ADAPTERS[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, entries = Path(sys.argv[1]), sys.argv[2:]
adapters = {}
for e in entries:
    name, reward, kl = e.split("|")
    if not (out / f"{name}.safetensors").is_file():
        continue
    item = {"file": f"{name}.safetensors", "reward": reward, "kl": float(kl), "rank": 4, "seed": 0,
            "calibration": "calibration.json"}
    if "=" in reward:
        item["weights"] = {k: float(v) for k, v in (p.split("=") for p in reward.split(","))}
    adapters[name] = item
manifest = {"about": "LoRA adapters (rank 4, diffusers LoRA safetensors) of the embedded colour model, fine-tuned "
                     "with DPOK on calibrated rewards by scripts/make_colour_adapters.sh.", "adapters": adapters}
(out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
print(f"manifest: {len(adapters)} adapters")
EOF
