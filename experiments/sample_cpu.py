"""The tiny interaction model (MODEL_SPEC.md §7) on 8 fake CPU devices, mesh data=2 x expert=4,
trained on the committed sample corpus (data/sample: conversations, video, text documents), with
a duplex evaluation (`tmlx.eval.duplex`) on its held-out conversations half-way and at the end.

Run:  python -m tmlx.main --config=experiments/sample_cpu.py --workdir=/tmp/tmlx_sample
Smaller, for tests:  --config=experiments/sample_cpu.py:tiny  (size tiny-2l, `base.cpu_test_run`)
"""

from experiments import base

SAMPLE_MIXTURE = "data/sample/conversations:0.6,data/sample/video:0.25,data/sample/text:0.15"


def get_config(arg=None):
  arg = base.parse_arg(arg, __file__, tiny=False, size="")
  c = base.get_config()
  base.apply_size(c, arg.size or ("tiny-2l" if arg.tiny else "tiny"), __file__)
  # 4 layers unrolled: about 10% faster per step on CPU, same compile time at this depth.
  c.model.scan_unroll = 4
  c.data.source = "episodes"
  c.data.mixture = SAMPLE_MIXTURE
  # Room for a 2x2-patch frame in every micro-turn of a row.
  c.data.max_patches = 64
  # Rows of text-only documents are almost all text targets.
  c.loss.max_text_target_fraction = 1.0
  c.mesh.data = 2
  c.mesh.expert = 4
  c.runtime.cpu_devices = 8
  c.checkpoint.every = 50
  # Each position attends to the latest 128 of its row's 256, and a live session's ring to 128.
  c.model.attention_window = 128
  c.stream.window = 128
  # Half-way and at the end: how the model does on the held-out conversations bundled with the sample.
  c.eval.every = 150
  c.eval.data = "data/sample/heldout/conversations,data/sample/heldout/video"
  c.eval.conversations = 5
  if arg.tiny:
    base.cpu_test_run(c)
  return c
