# Sourced by make_adapters.sh. finetune_adapters: fine-tune each entry of ADAPTERS
# ("name|reward|alpha") whose name contains ONLY (every entry when ONLY is empty) into OUT/name.safetensors,
# with its run in RUNS/name (resumed when it has checkpoints) and the shared options COMMON.
finetune_adapters() {
  mkdir -p "$RUNS" "$OUT"
  local entry name reward kl start
  for entry in "${ADAPTERS[@]}"; do
    IFS='|' read -r name reward kl <<<"$entry"
    [[ -n "$ONLY" && "$name" != *"$ONLY"* ]] && continue
    local resume=()
    [[ -d "$RUNS/$name/checkpoints" ]] && resume=(--resume)
    start=$SECONDS
    diffblend finetune --reward "$reward" --kl "$kl" --run-dir "$RUNS/$name" -o "$OUT/$name.safetensors" \
      "${COMMON[@]}" "${resume[@]}"
    echo "$name: $((SECONDS - start)) s wall"
  done
}
