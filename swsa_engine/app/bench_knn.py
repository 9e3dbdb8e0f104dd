"""``swsa bench --knn``: :func:`~swsa_engine.core.knn.knn_score` against a same-shape float32 matrix multiply.

For each bank size S the bench times, in one process and alternating, the plain product
``queries @ bank.T`` (``Q × D`` by ``D × S`` in float32: the floor any exact kNN must pay) and
``knn_score(queries, bank, k)`` (exact scores: float32 candidates, the ``k`` nearest recomputed in
float64 from the differences and certified), best of ``repeats``; efficiency is GEMM time / kNN
time. The exact recomputation costs ``Q × k × D`` float64 operations whatever S is, so small
banks cannot reach the product's speed (that product is itself only a read of the queries);
:func:`~swsa_engine.core.knn.knn_score_bounded` (float32 scores with a certified error bound each,
what the sweep uses before it refines the few scores an AUROC depends on) is timed beside it.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from swsa_engine.core.knn import knn_score, knn_score_bounded

__all__ = ["bench_knn", "format_knn_bench", "KNN_BANKS"]

#: bank sizes timed: the paper's support sizes (20–2,000) and a 20,000-row bank
KNN_BANKS = (20, 200, 2000, 20000)


def _best_seconds(function, repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def bench_knn(n_queries: int = 20000, dim: int = 2048, banks=KNN_BANKS, k: int = 3, repeats: int = 3,
              seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """One row per bank size: ``bank_rows``, ``gemm_s``, ``knn_score_s``, ``knn_score_efficiency``,
    ``bounded_s``, ``bounded_efficiency`` (GEMM seconds / kNN seconds), ``gemm_gflops``."""
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    rows = []
    for s in banks:
        bank = rng.standard_normal((s, dim), dtype=np.float32)
        q_t, b_t = torch.from_numpy(queries), torch.from_numpy(bank)
        tries = repeats if s < 20000 else 1
        gemm = _best_seconds(lambda: q_t @ b_t.T, repeats)
        exact = _best_seconds(lambda: knn_score(queries, bank, k), tries)
        bounded = _best_seconds(lambda: knn_score_bounded(queries, bank, np.arange(s)[None, :], k), tries)
        rows.append({"queries": n_queries, "dim": dim, "bank_rows": s, "k": k, "gemm_s": gemm, "knn_score_s": exact,
                     "knn_score_efficiency": gemm / exact, "bounded_s": bounded, "bounded_efficiency": gemm / bounded,
                     "gemm_gflops": 2.0 * n_queries * s * dim / gemm / 1e9})
        if progress:
            print(f"[bench] knn S={s}: GEMM {gemm * 1e3:.0f} ms, knn_score {exact * 1e3:.0f} ms "
                  f"({gemm / exact:.0%})", flush=True)
    return pd.DataFrame(rows)


def format_knn_bench(table: pd.DataFrame) -> str:
    """The kNN bench as lines of text."""
    lines = [f"knn_score vs a same-shape float32 GEMM ({int(table['queries'].iloc[0]):,} queries × "
             f"{int(table['dim'].iloc[0])} dims, k={int(table['k'].iloc[0])}; efficiency = GEMM time / kNN time):"]
    for row in table.itertuples():
        lines.append(f"  bank {row.bank_rows:>6,} rows: GEMM {row.gemm_s * 1e3:8.1f} ms ({row.gemm_gflops:6.1f} GFLOP/s)  "
                     f"knn_score {row.knn_score_s * 1e3:8.1f} ms = {row.knn_score_efficiency:4.0%}  "
                     f"knn_score_bounded {row.bounded_s * 1e3:8.1f} ms = {row.bounded_efficiency:4.0%}")
    return "\n".join(lines)
