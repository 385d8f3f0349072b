"""Data pipelines that produce the packed-batch contract (`data_pipelines.contract`).

Names are imported on first use, so that `python -m data_pipelines.<module>` commands run their
module once.
"""

from tmlx import lazy

__getattr__, __all__ = lazy.exports(
  __name__,
  {
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
  },
)
