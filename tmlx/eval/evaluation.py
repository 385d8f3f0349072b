"""The duplex evaluation of a model (`tmlx.eval.duplex`): every conversation run and scored
(`evaluate`), from a checkpoint (`evaluate_checkpoint`, what the command line runs) or inside a
training run (`TrainingProbe`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from data_pipelines.contract import MICRO_TURN_SECONDS
from tmlx import fields, paths
from tmlx.eval.conversations import Conversation, Transcript, load_conversations
from tmlx.eval.scoring import score, stream_words, summarize, voiced_windows
from tmlx.eval.speakers import Agent, SessionAgent, make_session, run_live, teacher_forced_mel
from tmlx.stream.config import SAMPLING_FIELDS, override


@dataclasses.dataclass
class Result:
  summary: dict
  conversations: list[dict]  # per conversation: id, turns, metrics, transcript


def evaluate(agent: Agent, conversations: Sequence[Conversation], *, session=None) -> Result:
  """Runs and scores every conversation; with `session`, also the teacher-forced mel error."""
  per, counts = [], []
  sampled, reference = [], []
  for conv in conversations:
    live = run_live(agent, conv)
    scored = score(conv, live)
    entry = {
      "id": conv.id,
      "duration_s": conv.duration,
      "metrics": summarize([scored["counts"]]),
      "turns": scored["turns"],
      "model": _transcript_json(live),
      "reference": _transcript_json(conv.reference),
      "_conversation": conv,  # for write_outputs, not written
      "_live": live,
    }
    if session is not None:
      s, r = teacher_forced_mel(session, conv)
      sampled.append(s)
      reference.append(r)
      err = float(np.mean(np.square(s - r)))
      entry["metrics"]["mel_error"] = err
    per.append(entry)
    counts.append(scored["counts"])
  mel = None
  if sampled:
    s, r = np.concatenate(sampled), np.concatenate(reference)
    mel = (float(np.mean(np.square(s - r))), float(np.mean(np.square(r - r.mean(axis=0)))))
  return Result(summarize(counts, mel), per)


def _transcript_json(tr: Transcript) -> dict:
  words = stream_words(tr.texts)
  return {
    "words": [[round(w.time, 3), w.text] for w in words],
    "said": {str(t): s for t, s in enumerate(tr.texts) if s},
    "calls": [[round((t + 1) * MICRO_TURN_SECONDS, 3), c] for t, c in tr.calls],
    "results": [[round(t * MICRO_TURN_SECONDS, 3), r] for t, r in tr.results],
    "voiced_windows": [int(t) for t in np.flatnonzero(voiced_windows(tr.mel))],
  }


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """`config.eval`, the duplex evaluation of a training run (experiments/base.py says what each
  field does)."""

  every: int
  data: str
  conversations: int
  report: bool

  def __post_init__(self):
    if self.every < 0:
      raise fields.FieldError(f"@every={self.every}: must be >= 0 (0: no duplex evaluation)")
    if self.every > 0:
      fields.positive(self, "conversations")
      if not self.data.strip():
        raise fields.FieldError("@data is empty: @every > 0 needs held-out episode datasets")


class TrainingProbe:
  """The duplex evaluation of a training run (config.eval): the held-out conversations are loaded
  once and one session is compiled once; each call scores the current parameters.

  Every process runs the probe on its first local device with a host copy of the parameters (the
  same computation everywhere, so no process waits on another): meant for models that fit one
  device, as the CPU presets do.
  """

  def __init__(self, config, graphdef):
    from data_pipelines.pipeline import resolve_dirs

    self.config, self.graphdef = config, graphdef
    self.dirs = [str(d) for d in resolve_dirs(config.eval.data)]
    for d in self.dirs:
      if not paths.is_file(paths.join(d, "manifest.json")):
        raise FileNotFoundError(
          f"config.eval.data: {d} is not an episode dataset (no manifest.json); build one with "
          "`python -m data_pipelines.build` or `python -m data_pipelines.sample_corpus`"
        )
    self.conversations, left_out = load_conversations(self.dirs, config, limit=config.eval.conversations)
    if not self.conversations:
      raise ValueError(f"config.eval.data={config.eval.data!r}: no conversation with audio ({left_out})")
    self.session = None

  def __call__(self, params, model_state) -> Result:
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    host = multihost_utils.process_allgather((params, model_state), tiled=True)
    local = jax.device_put(host, jax.local_devices()[0])
    model = nnx.merge(self.graphdef, *local)
    if self.session is None:
      self.session = make_session(model, self.config)
    else:
      self.session.set_model(model)
    return evaluate(SessionAgent(self.session), self.conversations, session=self.session)


STREAM_OVERRIDES = (*SAMPLING_FIELDS, "window")  # the config.stream fields an evaluation may override


def evaluate_checkpoint(
  checkpoint: str,
  data: Sequence[str],
  *,
  step: int | None = None,
  conversations: int | None = None,
  seed: int = 0,
  **stream: float | int | None,
) -> Result:
  """Restores `checkpoint` on one device and evaluates a session of it (sampling seed `seed`) on
  the first `conversations` conversations of the episode datasets `data`; the summary also holds
  the checkpoint step and the seconds the evaluation took. `stream`: config.stream fields to
  override (STREAM_OVERRIDES; None keeps the checkpoint's). A missing checkpoint or dataset raises
  SystemExit naming its flag."""
  for d in data:
    if not paths.is_file(paths.join(d, "manifest.json")):
      raise SystemExit(f"--data {d}: no episode dataset here (no manifest.json); build one with data_pipelines.build")
  import jax

  from tmlx.inference import load_model

  try:
    model, config, step = load_model(checkpoint, step=step, devices=jax.devices()[:1])
  except FileNotFoundError as e:
    raise SystemExit(f"--checkpoint: {e}") from None
  override(config, stream, STREAM_OVERRIDES, "evaluate_checkpoint")
  held_out, left_out = load_conversations(data, config, limit=conversations)
  if not held_out:
    raise SystemExit(f"--data {','.join(data)}: no conversation with audio ({left_out})")
  t0 = time.perf_counter()
  session = make_session(model, config, seed=seed)
  agent = SessionAgent(session)
  agent.seed = seed
  result = evaluate(agent, held_out, session=session)
  result.summary["checkpoint_step"] = step
  result.summary["seconds"] = round(time.perf_counter() - t0, 1)
  return result
