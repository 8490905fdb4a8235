#!/usr/bin/env bash
# Re-make the adapters shipped with the colour default model (src/diffblend/zoo/colour_adapters):
# the reward calibration of the base model, one LoRA adapter per reward of the demo pair
# (colourfulness, jpeg_compressibility) and three MORL oracles on that pair, each with reward-weighted
# regression (`diffblend finetune --algorithm rwr`), fixed seeds; then the manifest.
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
EPOCHS=${EPOCHS:-16}  # the shipped adapters: 16
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

# Reward-weighted regression (train/rwr.py): per epoch 64 images (8 prompts x 8), each weighted by
# exp(r / 0.1) within its prompt's group (r calibrated: 0.1 base sd), with a trust region: a group whose
# weights would have an effective sample size below 0.25 gets the smallest larger beta that reaches it
# (without it, one JPEG run gave one image nearly all the weight, pushed the rest away and its KL ran off
# to 300 nats). The denoising loss at 5 of the 20 grid points per image, anchored at the prediction of the
# model that drew the images (equal weights leave it where it is), AdamW steps of 16 images, plus the KL
# term alpha = 0.01. Every adapter has the same beta, trust region, alpha and epochs, so that they are
# aligned to one common target and the MORL oracles share it. The rollouts and the loss use no guidance
# (CFG 1: half the network calls, more varied images, and the regression fits the model that drew them);
# the adapters are used at CFG 3, as the base is. prompt_alignment is monitored to see reward hacking (an
# adapter that repaints the scene against its prompt). DPOK (--algorithm dpok, 24 epochs of 16 rollouts)
# moved the rewards by 0.1 to 0.2 sd on the previous base: docs/colour_default.md.
COMMON=(--model colour --prompts "$PROMPTS" --calibration "$OUT/calibration.json" --epochs "$EPOCHS"
        --algorithm rwr --rwr-beta 0.1 --rwr-min-ess 0.25 --prompts-per-epoch 8 --samples-per-prompt 8
        --minibatch-size 16 --timestep-fraction 0.25 --steps 20 --guidance-scale 1.0 --rank 4 --lr 1e-2
        --seed 0 --checkpoint-every 2 --no-progress --monitor "$REWARDS")

# name | reward | alpha (--kl)
ADAPTERS=(
  "colourfulness|colourfulness|0.01"
  "jpeg_compressibility|jpeg_compressibility|0.01"
  "morl_w0_5|colourfulness=0.5,jpeg_compressibility=0.5|0.01"
  "morl_w0_25|colourfulness=0.75,jpeg_compressibility=0.25|0.01"
  "morl_w0_75|colourfulness=0.25,jpeg_compressibility=0.75|0.01"
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
            "algorithm": "rwr", "rwr_beta": 0.1, "rwr_min_ess": 0.25,
            "calibration": "calibration.json"}
    if "=" in reward:
        item["weights"] = {k: float(v) for k, v in (p.split("=") for p in reward.split(","))}
    adapters[name] = item
manifest = {"about": "LoRA adapters (rank 4, diffusers LoRA safetensors) of the embedded colour model, fine-tuned "
                     "with reward-weighted regression on calibrated rewards by scripts/make_colour_adapters.sh.", "adapters": adapters}
(out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
print(f"manifest: {len(adapters)} adapters")
EOF
