"""A dataset build on Apache Beam: the shards of a plan (`data_pipelines.shards`) written in parallel
by whatever runner the options name (DirectRunner on one machine, DataflowRunner, FlinkRunner,
SparkRunner on a cluster), then merged into the manifest.

    python -m data_pipelines.build audio gs://bucket/recordings --out=gs://bucket/dataset \\
        --runner=DataflowRunner -- --project=P --region=R --temp_location=gs://bucket/tmp
    python -m data_pipelines.build audio recordings/ --out=dataset/ --runner=DirectRunner -- \\
        --direct_num_workers=4 --direct_running_mode=multi_processing

The arguments after `--` are the runner's own pipeline options; one Beam does not know is refused.
The pipeline is: the shards still to write (a rerun leaves out the complete ones) -> Reshuffle
(one shard per work item, spread over the workers) -> `write_shard` (build each of the shard's
items, stream its records into the shard, write its part) -> one element -> `merge` (the parts
into `manifest.json`, with the skips per reason). The items of every shard are listed once, by the
process that starts the pipeline, and travel with the plan. Apache Beam is the `beam` extra
(`pip install -e '.[beam]'`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from data_pipelines import shards

RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner", "PrismRunner")


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


def _write(s: int, plan: shards.Plan) -> int:
  logging.getLogger(__name__).info(
    "shard %d of %d written, %s", s, plan.shards, shards.describe(shards.write_shard(plan, s))
  )
  return s


def _merge(written: list[int], plan: shards.Plan) -> int:
  manifest = shards.merge(plan)
  return len(manifest["episodes"])


class PipelineError(RuntimeError):
  """The pipeline failed: a worker raised (a DataError under on_error="raise", a failed write), or
  the runner did. The message is the first line of the error the runner reported."""


def build(plan: shards.Plan, runner: str, args: Sequence[str] = ()) -> tuple[dict, int, int]:
  """Runs the build of `plan` on Beam; returns (manifest, shards written, shards reused). Raises
  PipelineError when the pipeline fails; the shards written by then are kept for a rerun."""
  beam = _beam()
  options = pipeline_options(runner, args)
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  todo = shards.prepare(plan)
  try:
    with beam.Pipeline(options=options) as p:
      (
        p
        | "shards to write" >> beam.Create(todo)
        | "one per worker" >> beam.Reshuffle()
        | "write shard" >> beam.Map(_write, plan)
        | "all written" >> beam.combiners.ToList()
        | "merge" >> beam.Map(_merge, plan)
      )
  except Exception as e:  # whatever the runner raises: it wraps the worker's error in its own
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    raise PipelineError(lines[-1] if lines else type(e).__name__) from e
  manifest = shards.read_manifest_json(plan)
  return manifest, len(todo), plan.shards - len(todo)
