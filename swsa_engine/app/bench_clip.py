"""Bench of the CLIP re-scoring: the prompt and BLISS cubes at paper scale on random arrays.

``python -m swsa_engine.app.bench_clip [task_fraction]`` (or ``swsa bench --clip``) prints the
seconds and shapes of :func:`bench_clip_rescoring`.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pandas as pd

from swsa_engine.app.bench_store import paper_catalog_tables, paper_shapes
from swsa_engine.core.clip_scores import l2_normalize
from swsa_engine.core.cube import ENSEMBLE, prompt_name
from swsa_engine.run.prompt_sweep import bliss_cube_from_arrays, build_cube, prompt_directions, prompt_scorer
from swsa_engine.run.task_groups import build_task_groups


def bench_clip_rescoring(*, task_fraction: float = 1.0, image_fraction: float = 1.0, dim: int = 640,
                         n_templates: int = 10, dictionary_size: int = 1842, seed: int = 0) -> dict:
    """Time the prompt and BLISS cubes on a paper-shaped set of tasks (329 at fraction 1) with
    random unit embeddings (ViT-B-16-plus-240's 640-d), 10 prompts + ensemble and the 6 × 4 BLISS
    grid. Returns seconds and shapes."""
    rng = np.random.default_rng(seed)
    images, tasks, members, _ = paper_catalog_tables(paper_shapes(task_fraction, image_fraction), 20, seed)
    groups = build_task_groups(images, tasks, members)
    n_images = len(images)
    unit = l2_normalize(rng.standard_normal((n_images, dim), dtype=np.float32))
    usable = np.ones(n_images, dtype=bool)
    text = l2_normalize(rng.standard_normal((len(tasks), 2, n_templates, dim)))
    by_task = {int(t): i for i, t in enumerate(tasks["task_id"])}
    started, cpu = time.perf_counter(), time.process_time()
    candidates = pd.DataFrame({"name": [prompt_name(j) for j in range(n_templates)] + [ENSEMBLE], "n_params": 0,
                               "feature_dim": dim, "weights_kind": "random", "family": "prompt"})

    def scorer_for(group):
        rows = [by_task[int(t)] for t in group.task_ids]
        return prompt_scorer(unit, prompt_directions(text[rows, 0], text[rows, 1], 100.0))

    prompt_cube = build_cube(scorer_for, groups, tasks, usable, candidates)
    prompt_seconds, prompt_cpu = time.perf_counter() - started, time.process_time() - cpu
    started, cpu = time.perf_counter(), time.process_time()
    classes = {int(t): v for t, v in zip(tasks["task_id"], l2_normalize(rng.standard_normal((len(tasks), dim))))}
    dictionary = l2_normalize(rng.standard_normal((dictionary_size, dim)))
    bliss_cube = bliss_cube_from_arrays(unit, usable, groups, tasks, classes, dictionary)
    bliss_seconds, bliss_cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"tasks": len(prompt_cube.tasks), "images": n_images, "dim": dim, "prompt_candidates": len(candidates),
            "bliss_candidates": len(bliss_cube.candidates), "dictionary": dictionary_size,
            "sources": len(prompt_cube.sources), "prompt_seconds": round(prompt_seconds, 2),
            "bliss_seconds": round(bliss_seconds, 2), "prompt_cpu_seconds": round(prompt_cpu, 2),
            "bliss_cpu_seconds": round(bliss_cpu, 2)}


if __name__ == "__main__":  # python -m swsa_engine.app.bench_clip [task_fraction]
    print(json.dumps(bench_clip_rescoring(task_fraction=float(sys.argv[1]) if len(sys.argv) > 1 else 1.0), indent=2))
