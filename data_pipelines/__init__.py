"""Data pipelines that produce the packed-batch contract (`data_pipelines.contract`)."""

from data_pipelines.contract import Kind, RowSpec, check_batch, min_positions_per_micro_turn
from data_pipelines.pipeline import make_dataset, make_source, row_spec, stacked_rows
from data_pipelines.tokenizer import ByteTokenizer

__all__ = [
  "ByteTokenizer",
  "Kind",
  "RowSpec",
  "check_batch",
  "make_dataset",
  "make_source",
  "min_positions_per_micro_turn",
  "row_spec",
  "stacked_rows",
]
