"""A dataset build on Apache Beam: the shards of a plan (`data_pipelines.shards`) written in parallel
by whatever runner the options name (DirectRunner on one machine, DataflowRunner, FlinkRunner,
SparkRunner on a cluster), then merged into the manifest.

    python -m data_pipelines.build audio gs://bucket/recordings --out=gs://bucket/dataset \\
        --runner=DataflowRunner -- --project=P --region=R --temp_location=gs://bucket/tmp
    python -m data_pipelines.build audio recordings/ --out=dataset/ --runner=DirectRunner -- \\
        --direct_num_workers=4 --direct_running_mode=multi_processing

The arguments after `--` are the runner's own pipeline options; one Beam does not know, a
malformed one and a runner Beam cannot make are refused in one line before any input is read. The
launching process lists the inputs, keeps the shards an earlier build completed (`shards.prepare`),
and writes each remaining shard's items beside its part (`shards.save_items`), so that the pipeline
carries shard numbers only: shards to write -> Reshuffle (one shard per work item, spread over the
workers) -> `write_shard` (read the shard's items, build each one, stream its records into the
shard, write its part). When the pipeline is done, the launching process merges the parts into
`manifest.json`, with the skips per reason. DataflowRunner's workers run on other machines, so its
inputs and `--out` must be on object storage; FlinkRunner's and SparkRunner's may share a file
system with the launching process, which is for whoever sets them up to know. Apache Beam is the
`beam` extra (`pip install -e '.[beam]'`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
from collections.abc import Sequence

from data_pipelines import shards
from tmlx import paths


def _beam():
  try:
    import apache_beam
  except ImportError:
    raise SystemExit("--runner needs Apache Beam: pip install -e '.[beam]'") from None
  return apache_beam


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not argparse's usage text
    raise SystemExit(f"bad pipeline option: {message}")


def pipeline_options(runner: str, args: Sequence[str]):
  """Beam's PipelineOptions for `runner` and the runner's own `args` (with the workers logging
  warnings and errors only, unless `args` say otherwise). SystemExit in one line for a runner Beam
  cannot make, a malformed option, an option no PipelineOptions class defines (Beam itself would
  only log that it dropped it) and a --runner among `args`."""
  _beam()
  from apache_beam.options import pipeline_options as po
  from apache_beam.runners import runner as runners

  try:
    runners.create_runner(runner)
  except (ValueError, RuntimeError, ImportError) as e:
    raise SystemExit(f"--runner={runner}: {' '.join(str(e).split())}") from None
  parser = _Parser(allow_abbrev=False, add_help=False)
  for cls in {str(c): c for c in po.PipelineOptions.__subclasses__()}.values():
    cls._add_argparse_args(parser)
  known, unknown = parser.parse_known_args(list(args))
  if unknown:
    raise SystemExit(f"unknown pipeline option {unknown[0]!r} (after --; see the options of {runner})")
  if any(a == "--runner" or a.startswith("--runner=") for a in args):
    raise SystemExit("give the runner as --runner before --, not among the pipeline options after it")
  quiet = [] if known.default_sdk_harness_log_level else ["--default_sdk_harness_log_level=WARNING"]
  return po.PipelineOptions([f"--runner={runner}", *quiet, *args])


def _write(s: int, skeleton: shards.Plan) -> int:
  part = shards.write_shard(shards.load_items(skeleton, s), s)
  logging.getLogger(__name__).info(
    "shard %d of %d written by process %d, %s", s, skeleton.shards, os.getpid(), shards.describe(part)
  )
  return s


class PipelineError(RuntimeError):
  """The pipeline failed: a worker raised (a DataError under on_error="raise", a failed write), or
  the runner did. The message is the last line of the error the runner reported (the worker's)."""


def check_paths(runner: str, inputs: Sequence[str], out: str) -> None:
  """SystemExit in one line when Dataflow's workers, on other machines, would be given local paths."""
  local = [x for x in [out, *inputs] if not paths.is_remote(x)]
  if runner.removesuffix("Runner").lower() == "dataflow" and local:
    raise SystemExit(f"--runner={runner}: its workers run on other machines; {local[0]} is a local path (use gs://)")


def build(plan: shards.Plan, options) -> tuple[dict, int, int]:
  """Writes the shards of `plan` that are not complete on Beam, with the `pipeline_options` given,
  then merges them here; returns (manifest, shards written, shards reused). Raises PipelineError
  when the pipeline fails; the shards written by then are kept for a rerun."""
  beam = _beam()
  todo = shards.prepare(plan)
  with concurrent.futures.ThreadPoolExecutor(16) as pool:  # one object per shard on object storage
    list(pool.map(lambda s: shards.save_items(plan, s), todo))
  skeleton = plan.without_items()
  quiet = logging.getLogger("apache_beam")
  level = quiet.level
  quiet.setLevel(logging.CRITICAL)  # the runner's own report of a worker's failure is many tracebacks long
  try:
    with beam.Pipeline(options=options) as p:
      (
        p
        | "shards to write" >> beam.Create(todo)
        | "one per worker" >> beam.Reshuffle()
        | "write" >> beam.Map(_write, skeleton)
      )
  except Exception as e:  # whatever the runner raises: it wraps the worker's error in its own
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    raise PipelineError(lines[-1] if lines else type(e).__name__) from None
  finally:
    quiet.setLevel(level)
  return shards.merge(plan), len(todo), plan.shards - len(todo)
