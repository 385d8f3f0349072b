"""A text-only tmlx model to serve as the background model of streaming sessions
(tmlx.stream.LanguageModelWorker): the interaction model's architecture trained by the same
trainer on text-only episodes (each micro-turn: typed text in, text out, no audio or video).

Train:  python -m tmlx.main --config=experiments/background_lm.py --workdir=/tmp/tmlx_bg_lm
Smaller, for tests:  --config=experiments/background_lm.py:tiny  (size tiny-2l, `base.cpu_test_run`)
"""

from experiments import base


def get_config(arg=None):
  arg = base.parse_arg(arg, __file__, tiny=False, size="")
  c = base.get_config()
  base.apply_size(c, arg.size or ("tiny-2l" if arg.tiny else "tiny"), __file__)
  c.data.source = "episodes"
  c.data.mixture = "data/sample/text:1.0"
  c.data.frame_height = 0
  c.data.frame_width = 0
  # Text-only rows: almost every position is a text target.
  c.loss.max_text_target_fraction = 1.0
  c.loss.flow_weight = 0.0
  c.mesh.data = 2
  c.mesh.expert = 4
  c.runtime.cpu_devices = 8
  c.checkpoint.every = 50
  if arg.tiny:
    base.cpu_test_run(c)
  return c
