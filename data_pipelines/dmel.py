"""Mel value conventions shared by the dMel input and the flow-matching output (MODEL_SPEC.md §2).

Log-mel values are log10 mel energies. dMel discretizes them into 16 bins with centres
-7 + 0.6·i; the flow head predicts them normalized to [-1, 1] as (clip(v, -7, 2) + 2.5) / 4.5.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.contract import NUM_DMEL_BINS

LOG_MEL_MIN = -7.0
LOG_MEL_MAX = 2.0
BIN_WIDTH = 0.6


def quantize(log_mel: np.ndarray) -> np.ndarray:
  """Log10 mel [...] float → dMel bins [...] uint8 (nearest bin centre)."""
  v = np.clip(log_mel, LOG_MEL_MIN, LOG_MEL_MAX)
  bins = np.rint((v - LOG_MEL_MIN) / BIN_WIDTH)
  return np.clip(bins, 0, NUM_DMEL_BINS - 1).astype(np.uint8)


def bin_centres() -> np.ndarray:
  return LOG_MEL_MIN + BIN_WIDTH * np.arange(NUM_DMEL_BINS, dtype=np.float32)


def normalize(log_mel: np.ndarray) -> np.ndarray:
  """Log10 mel → flow-head target in [-1, 1]."""
  return (np.clip(log_mel, LOG_MEL_MIN, LOG_MEL_MAX) + 2.5) / 4.5


def denormalize(x: np.ndarray) -> np.ndarray:
  """Flow-head output in [-1, 1] → log10 mel."""
  return np.asarray(x, np.float32) * 4.5 - 2.5
