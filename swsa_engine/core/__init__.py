"""Pure array functions: validation, metrics, kNN, detectors, CLIP scores, BLISS, selection. No I/O."""
