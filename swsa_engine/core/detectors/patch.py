"""Patch-level residual detector: InCTRL's patch-level residual, training-free (the few-shot PatchCore score).

For a query image with patch tokens ``x_1 .. x_P`` and ``K`` normal reference images with
patch tokens ``y`` (``K·P`` rows)::

    score(query) = max_p  min_{y in references} ||x_p − y||²

— the query's most anomalous patch, measured by its squared L2 distance to the nearest patch
of any reference image. The references are ``K`` normal images drawn (seeded per task, see
:meth:`PatchDetector.reference_slots`) from the task's usable bank, or the whole bank with
``K="all"`` (``K=0``). Leave-one-out: a query that is itself in the bank (a held-out normal)
never uses its own patches; it is compared with the first ``K`` drawn images that are not
itself, so every query sees exactly ``K`` references. The same holds for a query that leaves
out several bank images (``exclude`` (T, W, E): a synthetic anomaly without all its origins).

Exactness (float64): distances are computed in float32 (batched GEMMs in torch), with a
rigorous error bound per distance, ``|d32 − d| ≤ c·(||x||² + ||y||²)`` with
``c = 2·(2·γ_{D+2} + 12u)`` (u = 2⁻²⁴; it covers the dot products, the norms, the additions
and rounding float64 inputs to float32, with a factor 2 of margin). Only the query patches whose
bounds reach the query's maximum are refined, and for them only the reference patches whose
bounds reach the minimum: those distances are recomputed exactly in float64 as
``Σ (x − y)²``. The score therefore equals a float64 brute-force reference to float64
rounding (tested to 1e-9 relative), at the cost of the float32 pass plus a few exact rows.

Store side: ``swsa embed --patch-tokens`` writes ``/patches/<name>`` (``(N, P, D')`` float16);
:func:`swsa_engine.run.patch_features.load_patch_features` reads it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from swsa_engine.core.detectors.base import Detector, register_detector
from swsa_engine.core.knn.checks import distinct_exclusions, exclusion_array

__all__ = ["PatchDetector", "patch_cost"]

_U32 = 2.0 ** -24


def _bound_factor(dim: int) -> float:
    """``c`` of the float32 distance error bound ``|d32 − d| ≤ c·(||x||² + ||y||²)`` for ``dim``-d rows."""
    n = dim + 2
    gamma = n * _U32 / (1.0 - n * _U32)
    return 2.0 * (2.0 * gamma + 12.0 * _U32)


def _to_float32(array: np.ndarray, dev):
    """A float32 torch copy of ``array`` on ``dev`` (torch converts float16 much faster than numpy)."""
    array = np.ascontiguousarray(array)
    if array.dtype in (np.float16, np.float32, np.float64):
        return torch.from_numpy(array).to(device=dev, dtype=torch.float32, copy=True)
    return torch.from_numpy(array.astype(np.float32)).to(dev)


@dataclass(frozen=True)
class PatchDetector(Detector):
    """Patch-level residual. ``K`` normal reference images per task (``0`` = the whole bank),
    drawn with ``seed``; ``device`` ("cpu", "cuda") and ``chunk_bytes`` (the size of one block of
    float32 distances) change speed, never the scores."""

    K: int = 4
    seed: int = 0
    device: str = field(default="cpu", compare=False, repr=False)
    chunk_bytes: int = field(default=64 << 20, compare=False, repr=False)

    needs: ClassVar[str] = "patches"  # the sweep feeds (T, W, P, D) patch tokens, see load_patch_features
    supports_shared: ClassVar[bool] = False  # per-task queries only
    draws_references: ClassVar[bool] = True
    max_exclusions: ClassVar[int | None] = None  # a query uses the first K drawn images it does not exclude

    def __post_init__(self):
        if isinstance(self.K, bool) or not isinstance(self.K, (int, np.integer)) or self.K < 0:
            raise ValueError(f"patch needs an integer K >= 1 (or K=all), got K={self.K!r}; e.g. patch(K=4)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"patch needs an integer seed, got seed={self.seed!r}")

    @property
    def label(self) -> str:
        k = "all" if self.K == 0 else str(self.K)
        return f"patch(K={k})" if self.seed == 0 else f"patch(K={k},seed={self.seed})"

    @property
    def family(self) -> str:
        return "patch"

    def min_bank(self, has_heldout: bool | int) -> int:
        """Usable bank images a task needs: ``K`` (``K + 1`` when held-out normals are in the bank,
        so that a query never is its own reference; ``K + n`` when a query leaves out ``n`` images);
        with ``K=all`` 1 (2, 1 + n)."""
        return (self.K if self.K > 0 else 1) + int(has_heldout)

    @property
    def bank_hint(self) -> str:
        return "use a smaller K (e.g. patch(K=2)) or a larger support set"

    @property
    def reference_rule(self) -> str:
        """How the references are drawn, in words (for the sweep's record)."""
        if self.K == 0:
            return "every usable support image (K=all); a held-out normal never uses its own patches"
        return ("the first K of np.random.default_rng([seed, task_id]).permutation(usable support positions); "
                "a query that is one of them (or leaves some out) uses the next ones of the permutation instead")

    def references(self, bank_mask: np.ndarray, task_ids: np.ndarray) -> np.ndarray:
        """``(T, K)`` bank slots of each task's references (the first ``K`` of
        :meth:`reference_slots`; a query that is one of them uses slot ``K + 1`` of the draw in its
        place); ``(T, 0)`` for ``K=all``. For the sweep's record of the draw."""
        return self.reference_slots(bank_mask, task_ids)[:, : self.K]

    # ------------------------------------------------------------------ references
    def reference_slots(self, bank_mask: np.ndarray, task_ids: np.ndarray, spare: int = 1) -> np.ndarray:
        """``(T, J)`` int64 bank slots drawn as references, in draw order, padded with -1.

        For ``K >= 1``: ``J = K + spare`` — the first ``K + spare`` of
        ``np.random.default_rng([seed, task_id]).permutation(usable slots)`` (usable slots =
        ``flatnonzero(bank_mask[t])``, in slot order); a query uses the first ``K`` of them that
        it does not exclude (``spare``: the most slots one query excludes, at least 1). For
        ``K=all``: every usable slot. The draw depends on the task id, the seed and the task's
        bank only — not on the other tasks scored with it.
        """
        bank_mask = np.asarray(bank_mask, dtype=bool)
        task_ids = np.asarray(task_ids, dtype=np.int64).reshape(-1)
        n_usable = bank_mask.sum(axis=1)
        spare = max(1, int(spare))
        width = int(n_usable.max(initial=0)) if self.K == 0 else self.K + spare
        slots = np.full((bank_mask.shape[0], max(width, 1)), -1, dtype=np.int64)
        for t, (mask, task_id) in enumerate(zip(bank_mask, task_ids)):
            usable = np.flatnonzero(mask)
            if self.K == 0:
                slots[t, : len(usable)] = usable
            else:
                order = np.random.default_rng([int(self.seed), int(task_id)]).permutation(len(usable))
                drawn = usable[order[: self.K + spare]]
                slots[t, : len(drawn)] = drawn
        return slots

    def _allowed(self, slots: np.ndarray, exclude: np.ndarray) -> np.ndarray:
        """``(T, W, J)`` bool: the slots each query compares with (its excluded slots, ``exclude``
        (T, W, E), never)."""
        valid = slots >= 0
        own = ((slots[:, None, :, None] == exclude[:, :, None, :]) & (exclude[:, :, None, :] >= 0)).any(-1)
        usable = valid[:, None, :] & ~own
        if self.K == 0:
            return usable
        return usable & (np.cumsum(usable, axis=2) <= self.K)

    # ------------------------------------------------------------------ scores
    def score_tasks(self, queries, query_mask, bank, bank_mask, exclude, *, task_ids,
                    abnormal=None, abnormal_mask=None) -> np.ndarray:
        """Scores ``(T, W)`` float64 of queries ``(T, W, P, D)`` against references drawn from
        ``bank`` ``(T, S, P, D)``; NaN where ``~query_mask``.

        ``query_mask`` ``(T, W)`` and ``bank_mask`` ``(T, S)`` bool mark real rows (padding and
        rows without patch tokens are False); ``exclude`` ``(T, W)`` int64 is the bank slot of the
        query itself (leave-one-out) or -1, or ``(T, W, E)`` the slots it leaves out (-1 padded);
        ``task_ids`` ``(T,)`` seed the reference draw.
        ``abnormal`` / ``abnormal_mask`` are ignored (``needs_abnormal`` is False).
        """
        queries, bank = np.asarray(queries), np.asarray(bank)
        query_mask = np.asarray(query_mask, dtype=bool)
        bank_mask = np.asarray(bank_mask, dtype=bool)
        exclude = np.asarray(exclude, dtype=np.int64)
        task_ids = np.asarray(task_ids, dtype=np.int64).reshape(-1)
        if queries.ndim != 4 or bank.ndim != 4:
            raise ValueError(f"patch detector needs queries (T, W, P, D) and bank (T, S, P, D); "
                             f"got {queries.shape} and {bank.shape}: load them with load_patch_features")
        T, W, P, D = queries.shape
        S = bank.shape[1]
        if bank.shape[0] != T or bank.shape[2:] != (P, D):
            raise ValueError(f"patch detector: bank {bank.shape} does not fit queries {queries.shape}; "
                             "both need (T, ·, P, D) with the same T, P and D")
        for what, array, shape in (("query_mask", query_mask, (T, W)), ("bank_mask", bank_mask, (T, S)),
                                   ("exclude", exclude, (T, W) + exclude.shape[2:3]), ("task_ids", task_ids, (T,))):
            if array.shape != shape:
                raise ValueError(f"patch detector: {what} has shape {array.shape}, expected {shape}")
        exclude = distinct_exclusions(exclusion_array(exclude, (T, W), S, "a bank slot", "(T, W)"), query_mask, bank_mask)
        out = np.full((T, W), np.nan, dtype=np.float64)
        if T == 0 or W == 0 or not query_mask.any():
            return out

        slots = self.reference_slots(bank_mask, task_ids, spare=exclude.shape[2])
        allowed = self._allowed(slots, exclude)  # (T, W, J)
        self._check_references(allowed, query_mask, bank_mask, exclude, slots, task_ids)
        J = slots.shape[1]

        dev = torch.device(self.device)
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # the error bound assumes true float32 products (no TF32/bf16)
        try:
            per_task = W * P * J * P * 4
            tc = int(np.clip(self.chunk_bytes // max(per_task, 1), 1, T))
            for lo in range(0, T, tc):
                hi = min(lo + tc, T)
                active = np.flatnonzero(query_mask[lo:hi].any(axis=1)) + lo
                if len(active):
                    out[active] = self._score_chunk(queries[active], query_mask[active], bank, slots[active],
                                                    allowed[active], active, task_ids, dev)
        finally:
            torch.set_float32_matmul_precision(precision)
        return out

    def _check_references(self, allowed, query_mask, bank_mask, exclude, slots, task_ids) -> None:
        n_allowed = allowed.sum(axis=2)
        need = self.K if self.K > 0 else 1
        short = query_mask & (n_allowed < need)
        if not short.any():
            return
        t = int(np.flatnonzero(short.any(axis=1))[0])
        usable = int(bank_mask[t].sum())
        left_out = int((exclude[t] >= 0).sum(-1).max(initial=0))
        why = ""
        if left_out == 1 and self.K:
            why = " (K references + 1, since its held-out normals are in the bank)"
        elif left_out > 1 and self.K:
            why = f" (K references + {left_out}, since a query leaves {left_out} support images out)"
        raise ValueError(
            f"{self.label} needs {self.min_bank(left_out if left_out > 1 else bool(left_out))} usable normal support "
            f"images{why} but task {int(task_ids[t])} has {usable}; use a smaller K "
            f"(e.g. patch(K={max(1, usable - left_out)})) or skip such tasks with min_bank()"
        )

    def _score_chunk(self, queries, query_mask, bank, slots, allowed, task_rows, task_ids, dev) -> np.ndarray:
        """Scores ``(Tc, W)`` of one chunk of tasks (see :meth:`score_tasks`)."""
        Tc, W, P, D = queries.shape
        J = slots.shape[1]
        valid = slots >= 0
        refs = bank[task_rows[:, None], np.where(valid, slots, 0)]  # (Tc, J, P, D), source precision
        q32 = _to_float32(queries, dev)
        r32 = _to_float32(refs, dev)
        qm = torch.from_numpy(query_mask).to(dev)
        if not query_mask.all():
            q32[~qm] = 0.0
        if not valid.all():
            r32[~torch.from_numpy(valid).to(dev)] = 0.0
        q32 = q32.reshape(Tc, W * P, D)
        r32 = r32.reshape(Tc, J * P, D)
        nq = (q32 * q32).sum(-1)  # (Tc, W·P); NaN/inf in a row shows in its norm
        nr = (r32 * r32).sum(-1)  # (Tc, J·P)
        if not (torch.isfinite(nq).all() and torch.isfinite(nr).all()):
            bad = ~torch.isfinite(nq).view(Tc, -1).all(-1) | ~torch.isfinite(nr).view(Tc, -1).all(-1)
            t = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"patch tokens of task {int(task_ids[task_rows[t]])} hold NaN or inf in a masked-in row; "
                             "mask rows whose patch tokens are not done (load_patch_features(..., with_done=True))")

        # float32 pass: per query patch, the distance to the nearest patch of each reference image,
        # min_y (||x||² + ||y||² − 2 x·y) = ||x||² + min_y (||y||² − 2 x·y)
        nearest = torch.empty((Tc, W * P, J), dtype=torch.float32, device=dev)
        rows = int(max(1, self.chunk_bytes // max(1, Tc * J * P * 4)))
        r_t = r32.transpose(1, 2)
        nr_row = nr[:, None, :]
        for a in range(0, W * P, rows):
            b = min(a + rows, W * P)
            d = torch.baddbmm(nr_row, q32[:, a:b], r_t, alpha=-2.0)
            nearest[:, a:b] = d.view(Tc, b - a, J, P).amin(-1)
        nearest += nq[..., None]
        allow = torch.from_numpy(allowed).to(dev)  # (Tc, W, J)
        inf = torch.tensor(float("inf"), device=dev)
        m32 = torch.where(allow[:, :, None, :], nearest.view(Tc, W, P, J), inf).amin(-1)  # (Tc, W, P)

        # certificate: which query patches can hold the maximum
        c = _bound_factor(D)
        slot_nr = nr.view(Tc, J, P).amax(-1)  # (Tc, J)
        max_nr = torch.where(allow, slot_nr[:, None, :], torch.zeros((), device=dev)).amax(-1)  # (Tc, W)
        eps = c * (nq.view(Tc, W, P) + max_nr[..., None])
        floor = (m32 - eps).amax(-1, keepdim=True)
        cand = ((m32 + eps) >= floor) & qm[..., None]
        ct, cw, cp = (x.cpu().numpy() for x in torch.nonzero(cand, as_tuple=True))
        exact = self._refine(queries, refs, allowed, q32, r32, nq, nr, ct, cw, cp, dev)
        scores = np.full((Tc, W), -np.inf)
        np.maximum.at(scores, (ct, cw), exact)
        scores[~query_mask] = np.nan
        return scores

    def _refine(self, queries, refs, allowed, q32, r32, nq, nr, ct, cw, cp, dev) -> np.ndarray:
        """Exact float64 ``min_y ||x − y||²`` over the allowed reference patches, for the candidate
        query patches ``(ct, cw, cp)``: float32 distances with their bounds single out the
        possible nearest patches, which are recomputed as ``Σ (x − y)²`` in float64."""
        Tc, W, P, D = queries.shape
        J = refs.shape[1]
        c = _bound_factor(D)
        n = len(ct)
        exact = np.full(n, np.inf)
        if n == 0:
            return exact
        order = np.lexsort((cp, cw, ct))
        ct, cw, cp = ct[order], cw[order], cp[order]
        # pad the candidates of each task into (Tc, Cmax): one bmm per block for all tasks
        counts = np.bincount(ct, minlength=Tc)
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.arange(n) - start[ct]
        cmax = int(counts.max())
        block = int(max(1, self.chunk_bytes // max(1, Tc * J * P * 4)))
        allow_rows = torch.from_numpy(np.repeat(allowed, P, axis=2)).to(dev)  # (Tc, W, J·P)
        r_t = r32.transpose(1, 2)
        found_i, found_r = [], []
        for a in range(0, cmax, block):
            b = min(a + block, cmax)
            sel = (pos >= a) & (pos < b)
            st, sw, sp, spos = ct[sel], cw[sel], cp[sel], pos[sel] - a
            x = torch.zeros((Tc, b - a, D), dtype=torch.float32, device=dev)
            nx = torch.zeros((Tc, b - a), dtype=torch.float32, device=dev)
            ok = torch.zeros((Tc, b - a, J * P), dtype=torch.bool, device=dev)
            it, ipos = torch.from_numpy(st).to(dev), torch.from_numpy(spos).to(dev)
            qrow = torch.from_numpy(sw * P + sp).to(dev)
            x[it, ipos] = q32[it, qrow]
            nx[it, ipos] = nq[it, qrow]
            ok[it, ipos] = allow_rows[it, torch.from_numpy(sw).to(dev)]
            d = torch.baddbmm(nx[..., None] + nr[:, None, :], x, r_t, alpha=-2.0)
            eps = c * (nx[..., None] + nr[:, None, :])
            inf = torch.tensor(float("inf"), device=dev)
            ceiling = torch.where(ok, d + eps, inf).amin(-1, keepdim=True)
            near = ok & (d - eps <= ceiling)
            pt, ppos, pr = (v.cpu().numpy() for v in torch.nonzero(near, as_tuple=True))
            # map (task, position in block) back to the candidate index
            index = np.full((Tc, b - a), -1, dtype=np.int64)
            index[st, spos] = np.flatnonzero(sel)
            found_i.append(index[pt, ppos])
            found_r.append((pt, pr))
        cand_i = np.concatenate(found_i)
        pair_t = np.concatenate([f[0] for f in found_r])
        pair_r = np.concatenate([f[1] for f in found_r])
        # exact float64 distances of the near pairs, in blocks of ~chunk_bytes
        step = int(max(1, self.chunk_bytes // max(1, 8 * D * 2)))
        for a in range(0, len(cand_i), step):
            i, t, r = cand_i[a:a + step], pair_t[a:a + step], pair_r[a:a + step]
            x = queries[t, cw[i], cp[i]].astype(np.float64)
            y = refs[t, r // P, r % P].astype(np.float64)
            diff = x - y
            np.minimum.at(exact, i, (diff * diff).sum(-1))
        out = np.empty(n)
        out[order] = exact
        return out


@register_detector("patch")
def patch(K: int | str = 4, seed: int = 0) -> PatchDetector:
    """``patch(K=4)``: patch-level residual with K reference images; ``patch(K=all)`` uses the whole bank."""
    if isinstance(K, str):
        if K.strip().lower() == "all":
            K = 0
        elif K.strip().isdigit():
            K = int(K)
        else:
            raise ValueError(f"patch K must be a positive integer or 'all', got K={K!r}; e.g. patch(K=4)")
    return PatchDetector(K, int(seed))


# ---------------------------------------------------------------------- bench


def patch_cost(*, n_queries: int = 100, n_patches: int = 196, dim: int = 768, K: int = 4, bank_size: int = 20,
               n_tasks: int = 3, seed: int = 0, device: str = "cpu", repeats: int = 1) -> dict:
    """Time the patch-level score per task on random float16 tokens of a paper-like shape.

    Default: ViT-B/16 at 224 px (196 patches x 768), ``K=4`` references, 100 queries per task, a
    20-image bank. Returns ``{"ms_per_task", "seconds", "n_tasks", "shape", "float32_gflop_per_task"}``
    (the best of ``repeats``).
    """
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((n_tasks, n_queries, n_patches, dim), dtype=np.float32).astype(np.float16)
    bank = rng.standard_normal((n_tasks, bank_size, n_patches, dim), dtype=np.float32).astype(np.float16)
    query_mask = np.ones((n_tasks, n_queries), dtype=bool)
    bank_mask = np.ones((n_tasks, bank_size), dtype=bool)
    exclude = np.full((n_tasks, n_queries), -1, dtype=np.int64)
    detector = PatchDetector(K, seed, device=device)
    best = np.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        detector.score_tasks(queries, query_mask, bank, bank_mask, exclude, task_ids=np.arange(n_tasks))
        best = min(best, time.perf_counter() - start)
    refs = (K + 1 if K else bank_size) * n_patches
    return {
        "ms_per_task": 1e3 * best / n_tasks, "seconds": best, "n_tasks": n_tasks,
        "shape": {"queries": n_queries, "patches": n_patches, "dim": dim, "K": K or "all", "bank": bank_size},
        "float32_gflop_per_task": 2.0 * n_queries * n_patches * refs * dim / 1e9,
    }
