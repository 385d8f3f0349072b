"""A matmul-dominated MoE model for measuring MFU on one CPU device (benchmarks/mfu.py).

d_model 1024, 2 layers, 8 experts top-2 (d_ff 1024, no shared expert), seq 512, byte vocab,
fp32 compute (bf16 matmuls are slower than fp32 on the 2-core CPU), one device, capacity 1.0.

Benchmark:  python benchmarks/mfu.py            (times this preset's train step)
Train:      python -m tmlx.main --config=experiments/cpu_bench.py --workdir=/tmp/tmlx_cpu_bench
Smaller, for tests (8 fake devices, data=2 x expert=4):  --config=experiments/cpu_bench.py:tiny
"""

from experiments import base


def get_config(arg=None):
  c = base.get_config()
  m = c.model
  m.d_model = 1024
  m.num_layers = 2
  # Unrolled layers, like the dense reference's Python loop: XLA:CPU then skips copying each
  # layer's weights out of (and gradients into) the stacked arrays, ~10% of this step.
  m.scan_unroll = 2
  m.num_heads = 8
  m.num_kv_heads = 2
  m.head_dim = 128
  m.compute_dtype = "float32"
  m.moe.num_experts = 8
  m.moe.num_experts_per_tok = 2
  m.moe.num_shared_experts = 0
  m.moe.d_ff = 1024
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
  if arg == "tiny":
    m.d_model = 128
    m.num_heads = 4
    m.head_dim = 32
    m.moe.d_ff = 128
    m.flow.width = 64
    c.data.seq_len = 128
    c.data.global_batch_size = 8
    c.train.num_steps = 2
    c.checkpoint.every = 2
    c.mesh.data = 2
    c.mesh.expert = 4
    c.runtime.cpu_devices = 8
  elif arg:
    raise ValueError(f"experiments/cpu_bench.py: unknown argument {arg!r} (expected 'tiny' or none)")
  return c
