"""What a streaming session needs from an experiment config, built once (`StreamConfig.from_config`)
and checked when it is built: the cache layout (`config.stream`), the micro-turn limits and frame
size the model was trained with (`config.data`), and how to sample."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import ml_collections
from absl import flags

from tmlx import fields


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a session samples: text temperature (0 = greedy) and top-p; the flow head's noise
  temperature and Euler steps."""

  temperature: float = 0.0
  top_p: float = 1.0
  audio_temperature: float = 1.0
  audio_steps: int = 10

  @classmethod
  def from_config(cls, stream: ml_collections.ConfigDict) -> Sampling:
    return cls(stream.temperature, stream.top_p, stream.audio_temperature, stream.audio_steps)


@dataclasses.dataclass(frozen=True)
class StreamConfig:
  """A session's settings; the fields are those of `config.stream` and `config.data` that name them
  (`from_config`), checked when built."""

  window: int  # config.stream.window: a ring of this many positions; 0: the whole session
  max_positions: int  # config.stream.max_positions: the most a window-0 session holds
  input_chunk: int  # config.stream.input_chunk: positions prefilled per call
  attention_block: int  # config.stream.attention_block: cache slots attention reads at a time
  k_max: int  # config.data.k_max: text tokens the model says per micro-turn, at most
  k_max_text: int  # config.data.text_only_k_max: the same for a micro-turn without audio
  frame_shape: tuple[int, int]  # config.data.frame_height, frame_width (0, 0: no video)
  tokenizer: str  # config.data.tokenizer
  sampling: Sampling = Sampling()

  def __post_init__(self):
    fields.positive(self, "attention_block", "max_positions", "input_chunk")
    fields.in_range(self, "window", 0)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> StreamConfig:
    s, d = config.stream, config.data
    try:
      return cls(
        window=int(s.window),
        max_positions=int(s.max_positions),
        input_chunk=int(s.input_chunk),
        attention_block=int(s.attention_block),
        k_max=int(d.k_max),
        k_max_text=int(d.text_only_k_max),
        frame_shape=(int(d.frame_height), int(d.frame_width)),
        tokenizer=d.tokenizer,
        sampling=Sampling.from_config(s),
      )
    except fields.FieldError as e:
      raise e.at("config.stream.") from None


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(Sampling))  # config.stream fields of Sampling


def override(config: ml_collections.ConfigDict, overrides: Mapping, allowed: Sequence[str], where: str) -> None:
  """Sets `config.stream.<name>` to each value of `overrides` that is not None (None keeps the
  config's); TypeError naming `where` for a name not in `allowed`."""
  unknown = sorted(set(overrides) - set(allowed))
  if unknown:
    raise TypeError(f"{where}: unknown config.stream overrides {unknown}; expected {tuple(allowed)}")
  for name, value in overrides.items():
    if value is not None:
      config.stream[name] = value


def define_sampling_flags(fv: flags.FlagValues) -> None:
  """The flags of the commands that run sessions, one per SAMPLING_FIELDS (unset: the config's)."""
  flags.DEFINE_float("temperature", None, "Text sampling temperature (config.stream).", flag_values=fv)
  flags.DEFINE_float("top_p", None, "Text nucleus mass (config.stream).", flag_values=fv)
  flags.DEFINE_float("audio_temperature", None, "Flow-head noise τ (config.stream).", flag_values=fv)
  flags.DEFINE_integer("audio_steps", None, "Flow-head Euler steps (config.stream).", flag_values=fv)
