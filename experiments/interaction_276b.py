"""The full 276B-parameter, 12B-active interaction model (MODEL_SPEC.md §7), size 276b.

Pod run (256 devices):  python -m tmlx.main --config=experiments/interaction_276b.py \\
    --workdir=gs://BUCKET/interaction_276b
CPU variant with the same structure (size 276b-tiny, 8 fake devices):
    python -m tmlx.main --config=experiments/interaction_276b.py:tiny --workdir=/tmp/interaction_276b_tiny
"""

from experiments import base


def get_config(arg=None):
  arg = base.parse_arg(arg, __file__, tiny=False, size="")
  c = base.get_config()
  base.apply_size(c, arg.size or ("276b-tiny" if arg.tiny else "276b"), __file__)
  m = c.model
  m.rope_theta = 1e6
  m.remat = "full"
  # Dropless expert parallelism: exactly the routed tokens cross the expert axis (tmlx.nn.dropless).
  m.moe.transport = "dropless"
  m.moe.capacity_factor = 0.0
  c.data.seq_len = 8192
  c.data.global_batch_size = 256
  c.data.max_patches = 2048
  c.data.frame_height = 240
  c.data.frame_width = 320
  c.data.k_max = 16
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 2000
  c.train.num_steps = 500_000
  c.checkpoint.every = 1000
  c.logging.every = 50
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.expert = 16
  c.mesh.tensor = 4
  # Per accelerator (tmlx.runtime.accelerators; the chosen row is logged). On TPU, one slice of 256
  # chips holds a model replica's fsdp x expert x tensor; further slices add data parallelism
  # over DCN. On H100/H200 nodes of 8 GPUs (one process per node), experts stay within a node's
  # NVLink and FSDP spans the nodes (one row per GPU: no micro-batching, which would leave fewer
  # rows than GPUs).
  c.mesh_rules.tpu_v5p = dict(
    match="tpu v5p",
    mesh=dict(data=1, fsdp=4, expert=16, tensor=4),
    dcn=dict(data=-1, fsdp=1, expert=1, tensor=1),
    xla_flags=(
      "--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
      "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true"
    ),
    remat="full",
    # Two micro-batches of 128 rows: per chip the step peaks at 51.3 GiB instead of 63.9 GiB
    # (58.0% instead of 72.2% of 95 GB; `python -m tmlx.plan --compile --topology=v5p-512`).
    grad_accum_steps=2,
  )
  c.mesh_rules.gpu_hopper = dict(
    match="h100,h200",
    mesh=dict(data=1, fsdp=1, expert=8, tensor=1),
    dcn=dict(data=1, fsdp=-1, expert=1, tensor=1),
    xla_flags="--xla_gpu_enable_latency_hiding_scheduler=true",
    remat="full",
    # Capacity buffers, not dropless: XLA:GPU (jaxlib 0.10) runs ragged_dot as one dense matmul
    # per expert over every row of the receive buffer, 300 GiB of temporaries per GPU here.
    moe_transport="local",
    moe_capacity_factor=1.25,
  )
  if arg.tiny:
    c.data.seq_len = 256
    c.data.global_batch_size = 8
    c.data.max_patches = 48
    c.data.k_max = 8
    c.optimizer.grad_accum_steps = 2
    c.optimizer.warmup_steps = 1
    c.train.num_steps = 2
    c.checkpoint.every = 2
    c.logging.every = 1
    c.mesh.data = 1
    c.mesh.fsdp = 2
    c.mesh.expert = 2
    c.mesh.tensor = 2
    c.runtime.cpu_devices = 8
    # The rows above are for pods; on a small slice or one GPU host the tiny mesh is used as is.
    c.mesh_rules = type(c.mesh_rules)()
  # Streaming sessions attend to the whole session, as the model was trained to over one row, for
  # as long as one row (a ring would evict the context start that full attention leans on; train
  # with model.attention_window for sessions of any length).
  c.stream.window = 0
  c.stream.max_positions = c.data.seq_len
  return c
