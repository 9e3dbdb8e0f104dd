#!/usr/bin/env bash
# The GPU figures of issue 23, in one run on a CUDA machine (about 5 minutes on one H200):
#   1. the CUDA paths equal the CPU paths (tests/test_cuda_paths.py),
#   2. knn_score / knn_score_bounded vs the same-shape float32 GEMM on the GPU,
#   3. the paper-shaped sweep vs its GEMM floor, with the stage breakdown (--device cuda),
#   4. ingest images/s vs the forward pass alone, small (64 px) and large (224 px) inputs.
# Usage: bash scripts/gpu_bench.sh [OUT_DIR]   (default gpu-bench/)
# OUT_DIR receives five small files (log.txt, knn.json, sweep.json, ingest64.json, ingest224.json);
# the 5 GB store and the generated JPEG catalogs stay under WORK (default /tmp/swsa-gpu-bench).
# Runs without an installed `swsa` (python3 -m swsa_engine.app.cli from this checkout) and without
# faiss / open_clip / diffusers, which none of these paths needs.
# Knobs for a dry run on a CPU machine: DEVICE=cpu TASK_FRACTION=0.05 IMAGES=64 KNN_QUERIES=2000;
# SKIP_SWEEP=1 leaves out the paper-shaped sweep (about 4 of the 7 minutes: making its 5 GB store).
# Each step runs even when an earlier one failed (a failure is logged), so one broken step costs no figures.
set -uo pipefail
out="${1:-gpu-bench}"
work="${WORK:-/tmp/swsa-gpu-bench}"
device="${DEVICE:-cuda}"
task_fraction="${TASK_FRACTION:-1}"
images="${IMAGES:-1024}"
knn_queries="${KNN_QUERIES:-20000}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out" "$work"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
swsa() { python3 -m swsa_engine.app.cli "$@"; }
log="$out/log.txt"
: >"$log"
step() { echo "== $* ($(date -u +%T))" | tee -a "$log"; }

step device
python3 - "$device" <<'PY' 2>&1 | tee -a "$log"
import os, sys, torch
device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device: this script is for a GPU machine (DEVICE=cpu for a dry run)")
print(torch.__version__, torch.cuda.get_device_name(0) if device == "cuda" else "cpu", f"{os.cpu_count()} CPUs")
PY

step "CUDA paths equal CPU paths"
python3 -m pytest -q -p no:cacheprovider -o addopts="" "$repo/tests/test_cuda_paths.py" 2>&1 | tee -a "$log" || true

step "knn_score vs same-shape GEMM"
python3 - "$out/knn.json" "$device" "$knn_queries" <<'PY' 2>&1 | tee -a "$log"
import json, sys, time
import numpy as np, torch
from swsa_engine.core.knn import knn_score, knn_score_bounded
path, device, n_queries = sys.argv[1], sys.argv[2], int(sys.argv[3])
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
rng = np.random.default_rng(0)
queries = rng.standard_normal((n_queries, 2048), dtype=np.float32)

def best(function, repeats=3):
    function(); sync(); times = []
    for _ in range(repeats):
        sync(); start = time.perf_counter(); function(); sync(); times.append(time.perf_counter() - start)
    return min(times)

rows = []
for size in (20, 200, 2000, 20000):
    bank = rng.standard_normal((size, 2048), dtype=np.float32)
    q_dev, b_dev = torch.from_numpy(queries).to(device), torch.from_numpy(bank).to(device)
    gemm = best(lambda: q_dev @ b_dev.T, 5)  # operands already on the device: the floor
    exact = best(lambda: knn_score(queries, bank, 3, device=device))  # host arrays in, host scores out
    bounded = best(lambda: knn_score_bounded(queries, bank, np.arange(size)[None], 3, device=device))
    gemm_with_copies = best(lambda: (torch.from_numpy(queries).to(device) @ torch.from_numpy(bank).to(device).T).cpu())
    rows.append({"bank_rows": size, "gemm_s": gemm, "gemm_with_host_copies_s": gemm_with_copies,
                 "knn_score_s": exact, "knn_score_efficiency": gemm / exact,
                 "knn_score_efficiency_vs_host_gemm": gemm_with_copies / exact,
                 "bounded_s": bounded, "bounded_efficiency": gemm / bounded})
    print(json.dumps(rows[-1]))
from swsa_engine.app.bench import matmul_peak_gflops
peaks = {dtype: matmul_peak_gflops(dtype, device=device) for dtype in ("float32", "float64")}
print(json.dumps({"matmul_peak_gflops": peaks, "device": device}))
json.dump({"banks": rows, "matmul_peak_gflops": peaks, "device": device}, open(path, "w"), indent=2)
PY
[ -s "$out/knn.json" ] || echo "FAILED: knn" | tee -a "$log"

if [ -z "${SKIP_SWEEP:-}" ]; then
    step "paper-shaped sweep vs its GEMM floor"
    swsa bench --store "$work/paper.h5" --task-fraction "$task_fraction" --device "$device" \
        --out "$work/sweep" --quiet 2>&1 | tee -a "$log"
    cp "$work/sweep/bench.json" "$out/sweep.json" || echo "FAILED: sweep" | tee -a "$log"
fi

for size in 64 224; do
    step "ingest at $size px vs forward only"
    rm -rf "$work/ingest$size"
    swsa bench --ingest --device "$device" --quiet --image-size "$size" --images "$images" \
        --out "$work/ingest$size" 2>&1 | tee -a "$log"
    cp "$work/ingest$size/ingest.json" "$out/ingest$size.json" || echo "FAILED: ingest $size" | tee -a "$log"
done
step "figures in $out/"
