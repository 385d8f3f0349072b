"""Data pipelines that produce the packed-batch contract (`data_pipelines.contract`).

Names are imported on first use, so that `python -m data_pipelines.<module>` commands run their
module once.
"""

import importlib

_EXPORTS = {
  "ByteTokenizer": "data_pipelines.tokenizer",
  "Kind": "data_pipelines.contract",
  "MicroTurn": "data_pipelines.microturn",
  "RowSpec": "data_pipelines.contract",
  "check_batch": "data_pipelines.contract",
  "data_spec_hash": "data_pipelines.pipeline",
  "make_dataset": "data_pipelines.pipeline",
  "make_source": "data_pipelines.pipeline",
  "make_tokenizer": "data_pipelines.tokenizer",
  "min_positions_per_micro_turn": "data_pipelines.contract",
  "row_spec": "data_pipelines.pipeline",
  "stacked_rows": "data_pipelines.pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'data_pipelines' has no attribute {name!r}")
