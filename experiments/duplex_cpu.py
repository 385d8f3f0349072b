"""The CPU duplex recipe: a small interaction model that learns to take turns, answer, wait through
pauses, yield to barge-ins and use its background model, trained on 2 CPU cores in under an hour on
synthesized conversations, and scored on held-out ones by `python -m tmlx.eval duplex`.

Make the data (2,000 training conversations, and 40 held-out ones drawn from a random stream of their
own, so that no held-out conversation or voice recurs in training):
  python -m data_pipelines.sample_corpus --seed=100 --conversations=2000 --heldout=40 --videos=0 --texts=0 \\
      --seconds=14 --out=workdir/duplex_data
Train:  python -m tmlx.main --config=experiments/duplex_cpu.py --workdir=workdir/duplex
Score:  python -m tmlx.eval duplex --checkpoint=workdir/duplex --data=workdir/duplex_data/heldout/conversations
Both at once, with the target lines: python benchmarks/duplex.py
Smaller, for tests:  --config=experiments/duplex_cpu.py:tiny  (size tiny-2l, `base.cpu_test_run`, the bundled sample)
"""

from experiments import base

TRAIN = "workdir/duplex_data/conversations"
HELDOUT = "workdir/duplex_data/heldout/conversations"


def get_config(arg=None):
  arg = base.parse_arg(arg, __file__, tiny=False, size="")
  c = base.get_config()
  base.apply_size(c, arg.size or ("tiny-2l" if arg.tiny else "tiny"), __file__)
  c.model.compute_dtype = "float32"  # bf16 matmuls are slower on XLA:CPU
  c.model.scan_unroll = 4
  # One (t, x0) draw per audio target: the audio figures have room to spare, and the hour buys more steps.
  c.model.flow.num_draws = 1
  c.data.source = "episodes"
  c.data.mixture = TRAIN
  # Rows of 512 positions (about 9 s of conversation), each position attending to the latest 256 (about
  # 4.5 s): most positions see exactly what a live session's ring of 256 does, none leans on a row start.
  c.data.seq_len = 512
  c.data.global_batch_size = 4
  c.model.attention_window = 256
  c.stream.window = 256
  # Flow-head noise τ of live sessions: 0.5 scored higher word accuracy than 1.0 and 0 on a validation
  # corpus (sample_corpus --seed=200), the model hearing a cleaner version of its own voice.
  c.stream.audio_temperature = 0.5
  # A window cut from the middle of a conversation: 3 micro-turns (0.6 s) of context before its loss.
  c.loss.burn_in_micro_turns = 3
  c.eval.every = 1000
  c.eval.data = HELDOUT
  c.eval.conversations = 8
  c.runtime.cpu_devices = 1
  c.train.num_steps = 6400
  c.checkpoint.every = 500
  if arg.tiny:  # on the bundled sample, so that it runs on a fresh checkout
    base.cpu_test_run(c)
    c.data.mixture = "data/sample/conversations"
    c.eval.data = "data/sample/heldout/conversations"
    c.data.global_batch_size = 8  # shardable over the tests' 8 fake devices
    c.model.attention_window = c.stream.window = 64
  return c
