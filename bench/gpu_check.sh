#!/usr/bin/env bash
# One GPU check, under 8 minutes on one GPU: each method's `tiny` run (its train steps on
# the GPU; data generation and preparation stay on the CPU), the benchmark networks' JAX
# train steps and the detector's whole-volume forward on the GPU, and whole-scan detection
# seconds per scan. On a GPU, "auto" runs XLA's own convolutions.
#
#   bash bench/gpu_check.sh [OUT]      (OUT: folder for the logs, default gpu_check_out)
#
# Prints one summary table at the end; each part's log is in OUT/<part>.log.
set -u
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
export LUNGJAX_CONV_TUNE=0   # no CPU plan tuning on a GPU machine's host
python - <<'PY' | tee "$OUT/device.log"
import jax
print("devices:", [f"{d.platform}:{d.device_kind}" for d in jax.devices()])
assert jax.default_backend() == "gpu", "no GPU visible to JAX"
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
summary=()
for m in dou2017 xie2018 sathish2020 shrey2020 yu2021; do
  t0=$(date +%s)
  if timeout 150 python -m lungjax.main --config=configs/$m.py:tiny --workdir="$OUT/run_$m" \
      > "$OUT/$m.log" 2>&1; then status=ok; else status="failed (rc $?)"; fi
  summary+=("| $m tiny end to end | $status | $(( $(date +%s) - t0 )) s |")
done
# JAX's train steps of the benchmark networks on the GPU. (The PyTorch twins of
# bench/conv_vs_torch.py run on the CPU: a same-GPU ratio needs them moved to CUDA first.)
timeout 150 python bench/conv_vs_torch.py --nets fcn,fpr,det,unet --steps 3 --warmup 2 \
  --rounds 2 --jax-impls xla --no-torch --scan 300 --same-process --malloc default \
  > "$OUT/conv_vs_torch.log" 2>&1 && status=ok || status="failed (rc $?)"
summary+=("| JAX train steps + detector forward over 304^3 | $status, see conv_vs_torch.log | |")
t0=$(date +%s)
timeout 120 python bench/xie2018_inference.py --arg=tiny --scans=2 \
  > "$OUT/xie2018_inference.log" 2>&1 && status=$(tail -1 "$OUT/xie2018_inference.log") \
  || status="failed (rc $?)"
summary+=("| xie2018 whole-scan detection | $status | $(( $(date +%s) - t0 )) s |")
echo
echo "| part | result | wall |"
echo "|---|---|---|"
printf '%s\n' "${summary[@]}"
