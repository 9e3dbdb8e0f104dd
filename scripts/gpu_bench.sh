#!/usr/bin/env bash
# The GPU figures of issue 23, in one run on a CUDA machine (about 5 minutes on one H200):
#   1. the CUDA paths equal the CPU paths (tests/test_cuda_paths.py),
#   2. knn_score / knn_score_bounded vs the same-shape float32 GEMM on the GPU,
#   3. the paper-shaped sweep vs its GEMM floor, with the stage breakdown (--device cuda),
#   4. ingest images/s vs the forward pass alone, small (64 px) and large (224 px) inputs.
# Usage: bash scripts/gpu_bench.sh [OUT_DIR]   (default gpu-bench/); everything lands in OUT_DIR.
set -euo pipefail
out="${1:-gpu-bench}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script is for a GPU machine'; print(torch.cuda.get_device_name(0))" | tee "$out/device.txt"
python -m pytest -q -p no:cacheprovider tests/test_cuda_paths.py 2>&1 | tee "$out/cuda_paths.txt"
python - "$out" <<'PY'
import json, sys, time
import numpy as np, torch
from swsa_engine.core.knn import knn_score, knn_score_bounded
out = sys.argv[1]
rng = np.random.default_rng(0)
q = rng.standard_normal((20000, 2048), dtype=np.float32)
rows = []
for s in (20, 200, 2000, 20000):
    b = rng.standard_normal((s, 2048), dtype=np.float32)
    qt, bt = torch.from_numpy(q).cuda(), torch.from_numpy(b).cuda()
    def best(f, r=5):
        f(); torch.cuda.synchronize(); t = []
        for _ in range(r):
            torch.cuda.synchronize(); s0 = time.perf_counter(); f(); torch.cuda.synchronize(); t.append(time.perf_counter() - s0)
        return min(t)
    gemm = best(lambda: qt @ bt.T)  # on-device operands: the floor
    exact = best(lambda: knn_score(q, b, 3, device="cuda"), 3)  # host arrays in, host scores out
    bounded = best(lambda: knn_score_bounded(q, b, np.arange(s)[None], 3, device="cuda"), 3)
    rows.append({"bank_rows": s, "gemm_s": gemm, "knn_score_s": exact, "knn_score_efficiency": gemm / exact,
                 "bounded_s": bounded, "bounded_efficiency": gemm / bounded})
    print(rows[-1], flush=True)
json.dump(rows, open(f"{out}/knn_gpu.json", "w"), indent=2)
PY
swsa bench --store "$out/paper.h5" --device cuda --out "$out/sweep" --quiet 2>&1 | tee "$out/sweep.txt"
swsa bench --ingest --device cuda --quiet --out "$out/ingest64" 2>&1 | tee "$out/ingest64.txt"
swsa bench --ingest --device cuda --quiet --image-size 224 --images 1024 --out "$out/ingest224" 2>&1 | tee "$out/ingest224.txt"
echo "figures in $out/"
