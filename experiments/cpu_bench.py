"""A matmul-dominated MoE model for measuring MFU on one CPU device (benchmarks/mfu.py).

Size 69m: d_model 1024, 2 layers, 8 experts top-2 (d_ff 1024, no shared expert), byte vocab; seq
512, fp32 compute (bf16 matmuls are slower than fp32 on the 2-core CPU), one device, capacity 1.0.

Benchmark:  python benchmarks/mfu.py            (times this preset's train step)
Train:      python -m tmlx.main --config=experiments/cpu_bench.py --workdir=/tmp/tmlx_cpu_bench
Smaller, for tests (size 69m-tiny, 8 fake devices, data=2 x expert=4):  --config=experiments/cpu_bench.py:tiny
"""

from experiments import base


def get_config(arg=None):
  arg = base.parse_arg(arg, __file__, tiny=False, size="")
  c = base.get_config()
  base.apply_size(c, arg.size or ("69m-tiny" if arg.tiny else "69m"), __file__)
  m = c.model
  # Unrolled layers, like the dense reference's Python loop: XLA:CPU then skips copying each
  # layer's weights out of (and gradients into) the stacked arrays, ~10% of this step.
  m.scan_unroll = 2
  m.compute_dtype = "float32"
  # C = S·k/E exactly: the capacity buffers hold the model FLOPs and no padding.
  m.moe.capacity_factor = 1.0
  c.data.seq_len = 512
  c.data.global_batch_size = 8
  c.train.num_steps = 20
  c.optimizer.warmup_steps = 2
  c.logging.every = 1
  c.checkpoint.every = 0
  c.mesh.data = 1
  c.mesh.fsdp = 1
  c.mesh.expert = 1
  c.mesh.tensor = 1
  c.runtime.cpu_devices = 1
  if arg.tiny:
    c.data.seq_len = 128
    c.train.num_steps = 2
    c.checkpoint.every = 2
    c.mesh.data = 2
    c.mesh.expert = 4
    c.runtime.cpu_devices = 8
  return c
