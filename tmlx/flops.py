"""FLOPs accounting of the interaction model and model-FLOPs utilization (MFU).

`flops_per_token(config)` is the training cost (forward + backward) of one sequence position of
the model that `config` builds, in FLOPs (2 per multiply-add), counted from the matmuls of
`tmlx/nn/*` and `tmlx/losses.py`; elementwise work, gathers, norms and the optimizer update are
left out. Conventions:

- Backward: a matmul costs 2x its forward in the backward pass (the gradients with respect to
  its input and its weight), so 3x in all, except where its input is data and not a function of
  the parameters (the dMel one-hot, the first hMLP stage, the flow head's x_t and time-feature
  layers): there only the weight gradient is computed, 2x in all.
- Attention: with `count='model'` each query attends to the keys it can see on average in a
  causal sequence of S = data.seq_len positions: (S+1)/2, or with a window W of
  model.attention_window, W for all but the first W - 1 positions (packing into segments is not
  credited). With `count='executed'`, the keys the implementation computes logits for
  (`tmlx.nn.attention.resolve_impl` on the default backend): all S for 'dense'; those of the
  blocks the causal mask and the window leave for 'blockwise', 'splash' and 'pallas_gpu'
  (`tmlx.nn.blockwise.visited_keys_per_query`); the model count for 'cudnn'. The backward pass of
  the blockwise kernels recomputes the logits; like rematerialization, that is not counted.
- MoE: `'model'` counts the k routed experts of each token; `'executed'` the capacity-padded
  buffers of the 'local' and 'all_to_all' transports, E·C slots per row (`tmlx.nn.moe.capacity`),
  or the k·S assignment rows of the 'ragged' and 'dropless' grouped matmuls. The 'model' and buffer counts agree
  when capacity_factor = 1 and S·k/E is an integer.
- Heads run on the static target slots of a row whether they are filled or not:
  ceil(S·loss.max_text_target_fraction) text logits and ceil(S·loss.max_audio_target_fraction)
  flow-head targets (each with flow.num_draws draws), spread over the row's S positions.
- The hMLP stem runs on all data.max_patches patches of a row: max_patches / S per position.
- Rematerialization (model.remat) recomputes forward matmuls; that work is not counted.

Dimensions (MODEL_SPEC letters): S sequence, D model, N query heads, K kv heads, H head dim,
E experts, F expert hidden, C capacity, P patches, V vocab, M mel values, W stem / flow width.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Literal

import jax
import jax.numpy as jnp
import ml_collections

from data_pipelines.contract import NUM_DMEL_BINS, NUM_MELS, PATCH_SIZE
from tmlx.losses import target_slots
from tmlx.nn.attention import resolve_impl
from tmlx.nn.blockwise import visited_keys_per_query
from tmlx.nn.flow_head import TIME_FEATURES
from tmlx.nn.kernels import PALLAS_GPU_MAX_BLOCK
from tmlx.nn.model import DTYPES, ModelConfig
from tmlx.nn.moe import capacity

Count = Literal["model", "executed"]

# A matmul whose input depends on the parameters: forward, input gradient, weight gradient.
TRAIN = 3
# A matmul whose input is data: forward and weight gradient only.
TRAIN_DATA_INPUT = 2


@dataclasses.dataclass(frozen=True)
class FlopBreakdown:
  """Training FLOPs per sequence position, by part of the model."""

  attention_proj: float  # q, k, v (GQA) and output projections
  attention_mix: float  # q·k scores and probs·v
  router: float  # D x E router logits (fp32)
  routed_experts: float  # SwiGLU experts: top-k ('model') or capacity buffers ('executed')
  shared_experts: float  # always-on SwiGLU experts
  dmel_stem: float  # one-hot [F·80·16] x D bag of embeddings
  video_stem: float  # hMLP stages, max_patches / S patches per position
  text_head: float  # D x V logits at the text target slots
  flow_head: float  # flow-matching head at the audio target slots, num_draws each

  @property
  def total(self) -> float:
    return sum(dataclasses.astuple(self))

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def attention_keys(m: ModelConfig, seq_len: int, count: Count, platform: str | None = None) -> float:
  """Keys per query position that attention is charged for (module docstring)."""
  s, w = seq_len, m.attention_window
  model = (s + 1) / 2 if not w or w >= s else (w * s - w * (w - 1) / 2) / s
  if count == "model":
    return model
  impl = resolve_impl(m.attention_impl, platform or jax.default_backend(), s, w)
  if impl == "dense":
    return s
  if impl == "cudnn":
    return model
  block = min(m.attention_block, PALLAS_GPU_MAX_BLOCK) if impl == "pallas_gpu" else m.attention_block
  return visited_keys_per_query(s, block, w)


def flop_breakdown(config: ml_collections.ConfigDict, count: Count = "model") -> FlopBreakdown:
  """Training FLOPs per position of the model built from `config`, by part (module docstring)."""
  if count not in ("model", "executed"):
    raise ValueError(f"flop_breakdown: count={count!r}, expected 'model' or 'executed'")
  m = ModelConfig.from_config(config.model)
  s, d, layers = config.data.seq_len, m.d_model, m.num_layers
  n, kv, h = m.num_heads, m.num_kv_heads, m.head_dim
  moe, flow = m.moe, m.flow

  # Decoder blocks.
  attention_proj = layers * TRAIN * 2 * d * h * (2 * n + 2 * kv)
  keys = attention_keys(m, s, count)
  attention_mix = layers * TRAIN * 2 * (2 * n * h * keys)
  router = layers * TRAIN * 2 * d * moe.num_experts
  swiglu = 2 * 3 * d * moe.d_ff  # forward of one SwiGLU expert on one token
  if count == "model" or moe.transport in ("ragged", "dropless"):  # a grouped matmul over the k·S assignments
    expert_slots = moe.num_experts_per_tok
  else:  # capacity buffers [E, C] per row
    expert_slots = moe.num_experts * capacity(moe, s) / s
  routed_experts = layers * TRAIN * swiglu * expert_slots
  shared_experts = layers * TRAIN * swiglu * moe.num_shared_experts

  # Stems. Text and kind embeddings are gathers: no FLOPs.
  dmel_stem = TRAIN_DATA_INPUT * 2 * m.frames_per_position * NUM_MELS * NUM_DMEL_BINS * d
  w = m.stem_width or min(d // 4, 1024)
  cells1, cells2 = (PATCH_SIZE // 4) ** 2, (PATCH_SIZE // 8) ** 2  # 10x10 cells of 4x4 px, then 5x5 of 2x2
  per_patch = (
    TRAIN_DATA_INPUT * 2 * cells1 * (4 * 4 * 3) * w + TRAIN * 2 * cells2 * (4 * w) * w + TRAIN * 2 * (cells2 * w) * d
  )
  video_stem = per_patch * config.data.max_patches / s

  # Heads, on the static target slots of a row.
  text_slots, audio_slots = target_slots(config)
  text_head = TRAIN * 2 * d * m.vocab_size * text_slots / s
  fw, mel = flow.width, m.mel_dim
  per_draw = (
    TRAIN_DATA_INPUT * 2 * TIME_FEATURES * fw  # t_fc1 on sinusoidal features
    + TRAIN * 2 * fw * fw  # t_fc2
    + TRAIN_DATA_INPUT * 2 * mel * fw  # x_in on x_t
    + TRAIN * flow.depth * 2 * (3 * fw * fw + 2 * fw * fw)  # adaLN modulation, fc1, fc2
    + TRAIN * 2 * fw * (2 * fw)  # final adaLN modulation
    + TRAIN * 2 * fw * mel * 2  # velocity output and the x_t skip's gate
  )
  per_target = TRAIN * 2 * d * fw + flow.num_draws * per_draw  # cond(h) once, broadcast over draws
  flow_head = per_target * audio_slots / s

  return FlopBreakdown(
    attention_proj=float(attention_proj),
    attention_mix=float(attention_mix),
    router=float(router),
    routed_experts=float(routed_experts),
    shared_experts=float(shared_experts),
    dmel_stem=float(dmel_stem),
    video_stem=float(video_stem),
    text_head=float(text_head),
    flow_head=float(flow_head),
  )


def flops_per_token(config: ml_collections.ConfigDict, count: Count = "model") -> float:
  """Training FLOPs (forward + backward) per sequence position; the sum of `flop_breakdown`."""
  return flop_breakdown(config, count).total


# Dense (no sparsity) bf16 peak FLOP/s per chip from vendor specs, keyed by
# `jax.Device.device_kind`. TPU v5e and v6e report themselves as "lite", v5p as "TPU v5".
PEAK_FLOPS = {
  "TPU v2": 45e12,
  "TPU v3": 123e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5": 459e12,
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
  "NVIDIA A100-SXM4-40GB": 312e12,
  "NVIDIA A100-SXM4-80GB": 312e12,
  "NVIDIA A100-PCIE-40GB": 312e12,
  "NVIDIA A100 80GB PCIe": 312e12,
  "NVIDIA H100 80GB HBM3": 989e12,  # SXM
  "NVIDIA H100 PCIe": 756e12,
  "NVIDIA H100 NVL": 835e12,
  "NVIDIA H200": 989e12,
  "NVIDIA B200": 2250e12,
}


def measure_cpu_peak(dtype, size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a jitted [size, size] x [size, size] matmul in `dtype` (median of `repeats`)."""
  dtype = jnp.dtype(dtype)
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * size**3 / statistics.median(times)


@functools.cache
def _cpu_peak(dtype_name: str) -> float:
  return measure_cpu_peak(dtype_name)


def peak_flops_per_device(device: jax.Device, compute_dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s of one device, where the number comes from); (None, why) when unknown.

  On CPU the peak is measured (a matmul in `compute_dtype`) and shared among the process's CPU
  devices, since fake devices split one host's cores. Elsewhere it is the bf16 entry of
  PEAK_FLOPS, also for float32 compute (MFU is then measured against the bf16 peak).
  """
  if compute_dtype not in DTYPES:
    raise ValueError(f"peak_flops_per_device: compute_dtype={compute_dtype!r}, expected one of {tuple(DTYPES)}")
  if device.platform == "cpu":
    host = _cpu_peak(compute_dtype)
    shares = len(jax.local_devices(backend="cpu"))
    return host / shares, f"measured: {compute_dtype} matmul on this host's CPU, shared by {shares} CPU devices"
  kind = device.device_kind
  if kind not in PEAK_FLOPS:
    return None, f"unknown device kind {kind!r}: add its bf16 dense peak to tmlx.flops.PEAK_FLOPS"
  note = "" if compute_dtype in ("bfloat16", "float16") else f" (compute dtype {compute_dtype}; MFU vs the bf16 peak)"
  return PEAK_FLOPS[kind], f"table: bf16 dense peak of {kind!r}{note}"


def mfu(flops_per_token: float, tokens_per_s: float, num_devices: int, peak: float) -> float:
  """Model-FLOPs utilization: achieved FLOP/s over the peak of all `num_devices` devices."""
  return flops_per_token * tokens_per_s / (num_devices * peak)
