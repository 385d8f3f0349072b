"""What the absl command lines of tmlx and data_pipelines share: flag parsing and experiment-config
loading whose errors are one line naming what was wrong, not a traceback."""

from __future__ import annotations

import os
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags


def one_line(e: BaseException) -> str:
  """An exception's message in one line (a ConfigDict's wrapped KeyError unwrapped)."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  return " ".join(text.split()) or type(e).__name__


def parse_flags(argv):
  """absl's flag parsing (pass as `app.run(main, flags_parser=parse_flags)`), with a bad config
  override (an unknown field, a value of the wrong type) reported in one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    sys.exit(f"invalid flags: {one_line(e)}")


def load_config(flag) -> ml_collections.ConfigDict:
  """The value of a DEFINE_config_file flag; exits in one line when its file is missing or fails
  to build its config (config_flags defers that error to the first use of the value)."""
  try:
    config = flag.value
    config.keys()
    return config
  except Exception as e:
    path = config_flags.get_config_filename(flags.FLAGS[flag.name])
    sys.exit(f"invalid --config={path}: {one_line(e.__cause__ or e) if os.path.isfile(path) else 'no such file'}")
