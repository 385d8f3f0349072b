"""The CPU duplex recipe: a small interaction model that learns to take turns, answer, wait through
pauses, yield to barge-ins and use its background model, trained on 2 CPU cores in under an hour on
synthesized conversations, and scored on held-out ones by `python -m tmlx.eval duplex`.

Make the data (training and held-out conversations from different seeds):
  python -m data_pipelines.sample_corpus --seed=100 --conversations=1000 --videos=0 --texts=0 --seconds=14 \\
      --out=workdir/duplex_data/train
  python -m data_pipelines.sample_corpus --seed=7 --conversations=40 --videos=0 --texts=0 --seconds=14 \\
      --out=workdir/duplex_data/heldout
Train:  python -m tmlx.main --config=experiments/duplex_cpu.py --workdir=workdir/duplex
Score:  python -m tmlx.eval duplex --checkpoint=workdir/duplex --data=workdir/duplex_data/heldout/conversations
Both at once, with the target lines: python benchmarks/duplex.py
Smaller, for tests:  --config=experiments/duplex_cpu.py:tiny
"""

from experiments import base

TRAIN = "workdir/duplex_data/train/conversations"
HELDOUT = "workdir/duplex_data/heldout/conversations"


def get_config(arg=None):
  c = base.get_config()
  c.model.compute_dtype = "float32"
  c.model.scan_unroll = 4
  c.model.flow.num_draws = 2
  c.data.source = "episodes"
  c.data.mixture = TRAIN
  # Each position attends to as many as a training row holds, live as in training.
  c.stream.window = c.data.seq_len
  c.eval.every = 1000
  c.eval.data = HELDOUT
  c.eval.conversations = 8
  c.runtime.cpu_devices = 1
  c.train.num_steps = 3000
  c.checkpoint.every = 500
  c = base.tiny_variant(c, arg, "experiments/duplex_cpu.py")
  if arg == "tiny":  # the bundled sample, so that it runs on a fresh checkout
    c.data.mixture = "data/sample/conversations"
    c.eval.data = "data/sample/heldout/conversations"
    c.stream.window = c.data.seq_len
  return c
