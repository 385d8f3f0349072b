"""Writes the sample corpus's raw inputs in the formats `data_pipelines.build` reads.

Conversations go to stereo FLAC or paired WAV files (some at 22,050 Hz) with JSON, TextGrid or CTM
transcripts; videos to MP4 (a disc in the colour being talked about, and one level bar per
speaker) with a stereo audio track; text to .txt notes and a .jsonl file of chats. Each set is
drawn from a random stream of its own (`generator(seed, stream, i)`).
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import soundfile as sf
import soxr
from praatio import textgrid
from praatio.data_classes.interval_tier import IntervalTier
from praatio.data_classes.point_tier import PointTier

from data_pipelines import video
from data_pipelines.contract import MICRO_TURN_SECONDS, SAMPLE_RATE
from data_pipelines.sample_corpus.script import COLOURS, EVENT_TOPICS, chat, txt_document
from data_pipelines.sample_corpus.speech import Conversation, Voices, conversation


def generator(seed: int, *key: int) -> np.random.Generator:
  return np.random.default_rng([seed, *key])


def transcript_json(conv: Conversation) -> dict:
  out = {s: [{"word": w, "start": a, "end": b} for a, b, w in conv.words[s]] for s in ("user", "model")}
  out.update({k: [{"time": t, "text": x} for t, x in v] for k, v in conv.events.items() if v})
  return out


def write_conversation(raw: pathlib.Path, name: str, conv: Conversation, *, layout: str, transcript: str, rate: int):
  """Writes audio (`stereo` FLAC or `paired` WAVs at `rate`) and a json/TextGrid/ctm transcript."""
  audio = conv.audio
  if rate != SAMPLE_RATE:
    audio = soxr.resample(audio.T, SAMPLE_RATE, rate).T.astype(np.float32)
  if layout == "stereo":
    sf.write(raw / f"{name}.flac", audio.T, rate, subtype="PCM_16")
  else:
    sf.write(raw / f"{name}.user.wav", audio[0], rate, subtype="PCM_16")
    sf.write(raw / f"{name}.model.wav", audio[1], rate, subtype="PCM_16")
  if transcript == "json":
    (raw / f"{name}.json").write_text(json.dumps(transcript_json(conv), indent=1) + "\n")
  elif transcript == "TextGrid":
    grid = textgrid.Textgrid()
    for speaker in ("user", "model"):
      grid.addTier(IntervalTier(speaker, [(a, b, w) for a, b, w in conv.words[speaker]], 0, conv.duration))
    for field, events in conv.events.items():
      if events:
        grid.addTier(PointTier(field, [(t, x) for t, x in events], 0, conv.duration))
    grid.save(str(raw / f"{name}.TextGrid"), format="long_textgrid", includeBlankSpaces=True)
  else:
    lines = [";; utterance channel start duration word"]
    for channel, speaker in (("A", "user"), ("B", "model")):
      lines += [f"{name} {channel} {a:.3f} {b - a:.3f} {w}" for a, b, w in conv.words[speaker]]
    (raw / f"{name}.ctm").write_text("\n".join(lines) + "\n")


def video_frames(conv: Conversation, fps: float, size: int) -> np.ndarray:
  """Frames [T, size, size, 3]: a disc in the colour last spoken, and user/model level bars."""
  colour_marks = sorted(
    (a, COLOURS[re.sub(r"[^a-z]", "", w.lower())])
    for s in ("user", "model")
    for a, _, w in conv.words[s]
    if re.sub(r"[^a-z]", "", w.lower()) in COLOURS
  )
  count = int(np.ceil(conv.duration * fps - 1e-9))
  yy, xx = np.mgrid[0:size, 0:size]
  disc = (yy - 0.4 * size) ** 2 + (xx - 0.5 * size) ** 2 <= (0.28 * size) ** 2
  frames = np.empty((count, size, size, 3), np.uint8)
  window = round(SAMPLE_RATE / fps)
  for k in range(count):
    t = k / fps
    colour = (128, 128, 128)
    for at, c in colour_marks:
      if at <= t:
        colour = c
    frame = frames[k]
    frame[:] = (30, 30, 30)
    frame[disc] = colour
    s = round(t * SAMPLE_RATE)
    for c, (x0, bar) in enumerate(((0.05, (60, 200, 220)), (0.55, (250, 150, 40)))):
      level = float(np.sqrt(np.mean(conv.audio[c, s : s + window] ** 2))) if s < conv.audio.shape[1] else 0.0
      height = int(min(level * 10.0, 1.0) * 0.3 * size)
      if height:
        frame[size - 2 - height : size - 2, int(x0 * size) : int((x0 + 0.4) * size)] = bar
  return frames


def write_conversations(raw: pathlib.Path, voices: Voices, seed: int, stream: int, count: int, seconds: float) -> None:
  """Writes `count` conversations drawn from random stream `stream`, in every raw format the builder reads."""
  for i in range(count):
    transcript = "TextGrid" if i % 8 == 3 else "ctm" if i % 8 == 6 else "json"
    events = transcript != "ctm"  # CTM has no events
    first = None
    if events and i % 3 == 0:
      first = EVENT_TOPICS[i // 3 % 2]
    elif events and i % 3 == 1:
      first = ("numbers", "weather", "time")[i // 3 % 3]
    conv = conversation(generator(seed, stream, i), voices, seconds, events=events, first=first, typed_first=i % 3 == 1)
    layout = "paired" if i % 4 == 1 or transcript == "ctm" else "stereo"
    rate = 22050 if i % 5 == 2 else SAMPLE_RATE
    write_conversation(raw, f"conv-{i:03d}", conv, layout=layout, transcript=transcript, rate=rate)


def write_videos(
  raw: pathlib.Path, voices: Voices, seed: int, stream: int, count: int, seconds: float, size: int
) -> None:
  fps = 1 / MICRO_TURN_SECONDS
  for i in range(count):
    conv = conversation(generator(seed, stream, i), voices, seconds, events=True, first="colour", typed_first=False)
    name = f"video-{i:03d}"
    video.render_mp4(raw / f"{name}.mp4", video_frames(conv, fps, size), fps, conv.audio)
    (raw / f"{name}.json").write_text(json.dumps(transcript_json(conv), indent=1) + "\n")


def write_texts(raw: pathlib.Path, seed: int, count: int) -> None:
  """Writes `count` text documents: up to 4 .txt notes (stream 2), the rest chats in chats.jsonl (stream 3)."""
  notes = min(4, count)
  for i in range(notes):
    kind, text = txt_document(generator(seed, 2, i), i)
    (raw / f"notes-{i:02d}-{kind}.txt").write_text(text)
  if count > notes:
    chats = [json.dumps(chat(generator(seed, 3, i))) for i in range(count - notes)]
    (raw / "chats.jsonl").write_text("\n".join(chats) + "\n")
