#!/usr/bin/env bash
# Every GPU measurement of the "Scale and speed" issue in one run, each beside its peer, then one table.
#
#   benchmarks/gpu_suite.sh                      # all parts on cuda:0 (about 10 minutes on an H200)
#   benchmarks/gpu_suite.sh vdt unet             # some parts: vdt unet decode maxbatch data util
#   SMOKE=1 benchmarks/gpu_suite.sh              # CPU smoke run of every part at --quick sizes (no GPU needed)
#
# Run from the repository root in an environment with vdiff and its test extra (diffusers is the peer):
#   pip install -e '.[test]'. Results: $OUT (default benchmarks/gpu_results/<UTC date-time>/): one JSON and one
#   log per part, and table.md, the summary (also printed). Each part has its own time limit ($PART_TIMEOUT s,
#   default 600) and a failing part does not stop the others; its row says so.
#
# Parts (what, peer, target):
#   vdt      VDT-L/2 training step at the Cityscapes setup (batch 8, 16 frames, 16x16 SD-VAE latents, bf16
#            autocast, fused AdamW) vs diffusers Latte at matched FLOPs; counted FLOPs and MFU against a bf16
#            8192^3 matmul measured in the run. Target: Latte/ours >= 1.3.            (benchmarks/vdt_step.py)
#   unet     UNet-SVD (SVD config) bf16 training step at 320x576, 14 frames (40x72 latents) vs diffusers'
#            UNetSpatioTemporalConditionModel with the same weights; FLOPs, MFU. Target >= 1.0. (unet_step.py)
#   decode   SVD temporal-decoder VAE at 576x1024, 14 frames, bf16: full, chunked (4 frames) and chunked with
#            overlap 1 vs diffusers' AutoencoderKLTemporalDecoder (chunked as its pipeline does); frames/s,
#            peak memory, MFU.                                                         (autoencoder.py)
#   maxbatch largest training batch at 576x1024, 25 frames (SVD-XT, 72x128 latents), bf16 autocast, activation
#            checkpointing, with EMA (vdiff: shadows on the GPU, and in host memory) vs diffusers + EMAModel.
#                                                                                      (max_batch.py)
#   data     data loading at 1/4/8 workers: video shards (VideoDataModule beside raw PyAV) and latent shards
#            (LatentDataModule) against a VDT-L/2 step's consumption. Target: latents >= 10x. (dataloader.py)
#   util     GPU utilisation (nvidia-smi, every 100 ms) during a short VDT-L/2 bf16 training run on latent
#            shards with the EMA callback and num_workers auto.                        (gpu_util.py)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/gpu_results/$(date -u +%Y%m%d-%H%M%S)}
PART_TIMEOUT=${PART_TIMEOUT:-600}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(vdt unet decode maxbatch data util)

if [ "$SMOKE" = 1 ]; then
  DEV=(--device cpu); Q=(--quick)
else
  DEV=(--device cuda); Q=()
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: no CUDA device visible (SMOKE=1 runs the CPU smoke version)" >&2
    exit 2
  fi
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

run() {  # run NAME COMMAND...: log to $OUT/NAME.log, status to $OUT/NAME.status
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$PART_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - start))" > "$OUT/$name.status"
  tail -n 12 "$OUT/$name.log"
  echo "-- $name: exit $rc after $((SECONDS - start)) s"
}

for part in "${PARTS[@]}"; do
  case $part in
    vdt)
      if [ "$SMOKE" = 1 ]; then
        run vdt "$PY" benchmarks/vdt_step.py "${DEV[@]}" --quick --json "$OUT/vdt.json"
      else
        run vdt "$PY" benchmarks/vdt_step.py --device cuda --dtype bfloat16 --model VDT-L/2 --batch 8 --frames 16 \
          --size 16 --steps 20 --warmup 5 --json "$OUT/vdt.json"
      fi ;;
    unet)
      if [ "$SMOKE" = 1 ]; then
        run unet "$PY" benchmarks/unet_step.py "${DEV[@]}" --quick --json "$OUT/unet.json"
      else
        run unet "$PY" benchmarks/unet_step.py --device cuda --dtype bfloat16 --model svd --batch 1 --frames 14 \
          --size 40 72 --steps 10 --warmup 3 --json "$OUT/unet.json"
      fi ;;
    decode)
      if [ "$SMOKE" = 1 ]; then
        run decode "$PY" benchmarks/autoencoder.py "${DEV[@]}" --quick --json "$OUT/decode.json"
      else
        run decode "$PY" benchmarks/autoencoder.py --device cuda --dtype bfloat16 --config svd --size 576 1024 \
          --frames 14 --chunk 4 --overlap 1 --repeats 3 --json "$OUT/decode.json"
      fi ;;
    maxbatch)
      if [ "$SMOKE" = 1 ]; then
        run maxbatch "$PY" benchmarks/max_batch.py "${DEV[@]}" --quick --json "$OUT/maxbatch.json"
      else
        run maxbatch "$PY" benchmarks/max_batch.py --device cuda --model svd-xt --frames 25 --size 72 128 \
          --max-batch 16 --ema device cpu --json "$OUT/maxbatch.json"
      fi ;;
    data)
      if [ "$SMOKE" = 1 ]; then
        run data_latents "$PY" benchmarks/dataloader.py --latents --quick --workers 1 2 --json "$OUT/data_latents.json"
        run data_video "$PY" benchmarks/dataloader.py --quick --workers 1 2 --json "$OUT/data_video.json"
      else
        run data_latents "$PY" benchmarks/dataloader.py --latents --workers 1 4 8 --json "$OUT/data_latents.json"
        run data_video "$PY" benchmarks/dataloader.py --workers 1 4 8 --json "$OUT/data_video.json"
      fi ;;
    util)
      if [ "$SMOKE" = 1 ]; then
        run util "$PY" benchmarks/gpu_util.py --quick --json "$OUT/util.json"
      else
        run util "$PY" benchmarks/gpu_util.py --device cuda --model VDT-L/2 --steps 80 --skip 20 --workers auto \
          --json "$OUT/util.json"
      fi ;;
    *) echo "gpu_suite: unknown part $part (vdt unet decode maxbatch data util)" >&2; exit 2 ;;
  esac
done

"$PY" - "$OUT" <<'EOF' | tee "$OUT/table.md"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def status(name):
    path = out / f"{name}.status"
    if not path.exists():
        return "not run"
    rc, seconds = path.read_text().split()
    return f"ok, {seconds} s" if rc == "0" else f"FAILED (exit {rc}, {seconds} s; see {name}.log)"


rows = []
vdt = load("vdt")
if vdt:
    o, p = vdt["ours"], vdt["peer"]
    rows.append(("VDT step, Cityscapes setup vs Latte", vdt["device"], f"{o['median_ms']:.1f} vs {p['median_ms']:.1f} ms",
                 f"{vdt['time_ratio']:.2f}x (target >= 1.3)", f"MFU {100 * o['mfu']:.1f}% vs {100 * p['mfu']:.1f}% "
                 f"(matmul {vdt['matmul_tflops']:.3g} TFLOP/s); memory {o['peak_mib']:.0f} vs {p['peak_mib']:.0f} MiB"))
unet = load("unet")
if unet:
    o, p = unet["ours"], unet["peer"]
    rows.append(("UNet-SVD step vs diffusers", unet["device"], f"{o['median_ms']:.1f} vs {p['median_ms']:.1f} ms",
                 f"{unet['time_ratio']:.2f}x (target >= 1.0)", f"MFU {100 * o['mfu']:.1f}% vs {100 * p['mfu']:.1f}%; "
                 f"memory {o['peak_mib']:.0f} vs {p['peak_mib']:.0f} MiB; input {unet['input']}"))
dec = load("decode")
if dec:
    for r in dec["rows"]:
        rows.append((f"VAE {r['case']} vs diffusers", dec["device"], f"{r['vdiff_fps']:.2f} vs {r['diffusers_fps']:.2f} frames/s",
                     f"{r['speed_ratio']:.2f}x", f"memory {r['vdiff_mib']:.0f} vs {r['diffusers_mib']:.0f} MiB; MFU "
                     f"{100 * r['vdiff_mfu']:.1f}% vs {100 * r['diffusers_mfu']:.1f}%"))
mb = load("maxbatch")
if mb:
    for r in mb["results"]:
        rows.append((f"largest batch: {r['name']}", mb["device"], f"batch {r['batch']}",
                     f"{r.get('step_s', float('nan')):.2f} s/step", f"peak {r.get('peak_gib', float('nan')):.1f} GiB; {r['stopped']}"))
lat = load("data_latents")
if lat:
    best = max(lat["workers"].items(), key=lambda kv: kv[1]["samples_per_s"])
    per = ", ".join(f"{w}: {v['samples_per_s']:.0f}/s" for w, v in lat["workers"].items())
    rows.append(("latent shards vs a VDT-L/2 step", f"{lat['cores']} cores", per,
                 f"{best[1]['times_consumption']:.1f}x consumption (target >= 10x)", f"step {lat['step_ms']:.0f} ms per {lat['step_batch']}"))
vid = load("data_video")
if vid:
    per = ", ".join(f"{w}: {v:.1f}/s" for w, v in vid["clips_per_s"].items())
    rows.append(("video shards, clips/s by workers", f"{vid['cores']} cores", per, f"raw PyAV {vid['raw_clips_per_s']:.1f}/s",
                 f"{vid['clip_frames']} frames at {vid['clip_size']}px"))
util = load("util")
if util:
    rows.append(("GPU utilisation, VDT training run", util["device"], f"{util['util_mean']:.0f}% mean, {util['util_median']:.0f}% median",
                 f"{util['step_ms']:.0f} ms/step", f"{util['workers']} workers, {util['measured_steps']} steps, {util['samples_per_s']:.1f} samples/s"))

print(f"# gpu_suite results ({out})\n")
print("| measurement | device | vdiff vs peer | ratio / target | notes |")
print("|---|---|---|---|---|")
for row in rows:
    print("| " + " | ".join(str(c) for c in row) + " |")
print()
for name in ("vdt", "unet", "decode", "maxbatch", "data_latents", "data_video", "util"):
    print(f"- {name}: {status(name)}")
EOF
