"""`python -m data_pipelines.sample_corpus`: the command line that `data_pipelines.sample_corpus` describes."""

from data_pipelines import sample_corpus
from data_pipelines.sample_corpus.cli import PROG, define_flags, run
from tmlx import cli

if __name__ == "__main__":
  __doc__ = sample_corpus.__doc__  # what --help prints
  cli.app_main(PROG, define_flags, run)
