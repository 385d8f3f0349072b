"""Streaming sessions (tmlx.stream): parity with the full forward pass, fixed shapes, limits."""

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from data_pipelines import video
from data_pipelines.contract import Kind
from tests.helpers import ROOT, run_main, synthetic_batch, tiny_config
from tmlx.eval import losses as tmlx_eval
from tmlx.nn.model import ModelConfig
from tmlx.state import new_model
from tmlx.stream import InputBlock, LanguageModelWorker, ScriptedWorker, Session, SessionFull, StreamConfig


def _setup(**stream):
  c = tiny_config("tiny")
  c.model.compute_dtype = "float32"
  c.model.moe.capacity_factor = 0.0  # the session routes dropless; so must the reference pass
  c.stream.window = 0
  c.stream.max_positions = 256
  c.stream.input_chunk = 16  # smaller than most input blocks here: they take several chunks
  c.stream.attention_block = 32  # a row's attention spans several blocks of the cache
  c.stream.update(stream)
  c.model.attention_window = c.stream.window  # the session attends as the model was trained to
  return c, new_model(ModelConfig.from_config(c.model), 0)


@pytest.mark.parametrize("window", [0, 16], ids=["whole_session", "ring_window"])
def test_teacher_forced_session_matches_one_full_forward_pass(window):
  """A recorded row fed through Session.run_block micro-turn by micro-turn (its outputs forced)
  gives the text logits and flow-head conditioning vectors of one forward pass over the row,
  also with a window: then the cache is a ring (32 slots here) that the row wraps around."""
  c, model = _setup(window=window)
  batch = synthetic_batch(c, step=0, rows=1)
  row = {k: np.asarray(v[0]) for k, v in batch.items()}
  n = int((row["segment_ids"] == 1).sum())
  kind = row["kind"][:n]
  assert (kind == Kind.PATCH).any() and (kind == Kind.TEXT_IN).any()  # frames and typed text too
  hidden = model(batch).hidden[0, :n]  # the model's own attention window
  ref_logits = np.stack([model.text_logits(hidden[p]) for p in range(n - 1) if kind[p + 1] == Kind.TEXT_OUT])
  ref_cond = np.stack([model.flow_head.cond(hidden[p]) for p in range(n - 1) if kind[p + 1] == Kind.AUDIO_OUT])

  session = Session(model, StreamConfig.from_config(c))
  assert session.cache_slots == (32 if window else 288) and n > 3 * 32  # the ring wraps 3 times
  starts = [i for i in range(n) if kind[i] == Kind.MT] + [n]
  logits, cond = [], []
  for a, b in zip(starts[:-1], starts[1:]):
    k = kind[a:b]
    out_at = a + int(np.argmax(k == Kind.TEXT_OUT))
    block = InputBlock(
      *(row[f][a:out_at] for f in ("kind", "tokens", "dmel", "patch_index")), row["patches"], row["patch_rowcol"]
    )
    out = session.run_block(
      block,
      forced_text=list(row["tokens"][a:b][k == Kind.TEXT_OUT]),
      forced_audio=row["dmel"][a:b][k == Kind.AUDIO_OUT],
      record=True,
    )
    logits += list(out.text_logits)
    cond += list(out.flow_cond)
  assert session.position == n
  assert len(logits) == len(ref_logits) and len(cond) == len(ref_cond) == 4 * (len(starts) - 1)
  # fp32; the cache's attention sums block by block (online softmax), in another order.
  np.testing.assert_allclose(np.stack(logits), ref_logits, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.stack(cond), ref_cond, atol=2e-5, rtol=1e-5)


def test_a_session_attends_as_its_model_was_trained_to():
  c, model = _setup(window=16)
  c.stream.window = 32
  with pytest.raises(
    ValueError, match=r"config\.stream\.window=32, but the model was trained with model\.attention_window=16"
  ):
    Session(model, StreamConfig.from_config(c))


def test_live_steps_keep_fixed_shapes_and_stop_at_the_cache_limit():
  c, model = _setup(max_positions=128, temperature=0.8, top_p=0.9)
  session = Session(model, StreamConfig.from_config(c), seed=1)
  rng = np.random.default_rng(0)
  frame = rng.integers(0, 255, (c.data.frame_height, c.data.frame_width, 3), dtype=np.uint8)
  sizes = []
  for t in range(3):
    audio = (rng.standard_normal(3200) * 3000).astype(np.int16)
    typed = "hi there, how are you?" if t == 2 else None  # a block of 2 chunks
    out = session.step(audio, frame=frame if t == 1 else None, typed_text=typed)
    assert out.mel.shape == (16, 80) and np.all(np.abs(out.mel) <= 1)
    assert len(out.text_ids) <= c.data.k_max and all(i < 272 for i in out.text_ids)
    sizes.append(tuple(p._cache_size() for p in (session._programs.prefill, session._programs.turn)))
  assert session.transcript[2][1] == "<user_text>hi there, how are you?</user_text>"
  session.reset()
  session.step(np.zeros(3200, np.int16))
  sizes.append(tuple(p._cache_size() for p in (session._programs.prefill, session._programs.turn)))
  # compiled once, whatever the block held, reset included
  assert sizes[0] == (0, 1) and sizes[2] == sizes[-1] == (1, 1), sizes
  with pytest.raises(SessionFull, match=r"config\.stream\.max_positions=128"):
    for _ in range(10):
      session.step(np.zeros(3200, np.int16))
  with pytest.raises(ValueError, match="3200 samples"):
    session.step(np.zeros(1600, np.int16))


def test_a_background_result_arrives_in_the_micro_turn_the_worker_delivers_it():
  """The model's <bg_call> span (forced here) goes to the worker with the conversation so far; the
  scripted worker answers 2 micro-turns later, and the answer is a <bg_result> span of that
  micro-turn's input."""
  c, model = _setup()
  worker = ScriptedWorker({"weather Paris": "sunny, 21 C"}, delay=2)
  session = Session(model, StreamConfig.from_config(c), worker=worker)
  tok, eot = session.tokenizer, session.tokenizer.special("<eot>")
  call = [tok.special("<bg_call>"), *tok.encode("weather Paris"), tok.special("</bg_call>")]
  k = c.data.k_max  # the span is longer than K_max: it continues in the next micro-turn
  silence = np.zeros(3200, np.int16)
  outs = [session.step(silence, typed_text="what's the weather?")]
  outs.append(session.step(silence, forced_text=[*call[:k], eot]))
  outs.append(session.step(silence, forced_text=[*call[k:], eot]))
  outs += [session.step(silence) for _ in range(3)]
  assert [o.bg_calls for o in outs[:3]] == [[], [], ["weather Paris"]]
  ((_, text, context),) = worker.calls
  assert text == "weather Paris" and "user: <user_text>what's the weather?</user_text>" in context
  heard = [h for _, h, _ in session.transcript]  # submitted after micro-turn 2: due in micro-turn 4
  assert heard[4] == "<bg_result>sunny, 21 C</bg_result>" and not any(heard[i] for i in (1, 2, 3, 5))


def test_language_model_worker_answers_in_a_thread():
  c = importlib.import_module("experiments.background_lm").get_config("tiny")
  c.stream.max_positions = 256
  model = new_model(ModelConfig.from_config(c.model), 0)
  worker = LanguageModelWorker(model, StreamConfig.from_config(c), max_micro_turns=2)
  worker.submit("2+2?", "user: hello")
  worker.close()
  (answer,) = worker.poll()
  assert isinstance(answer, str) and worker.poll() == []


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A tiny model trained for 2 steps on the sample corpus, through tmlx.main."""
  workdir = tmp_path_factory.mktemp("stream_ckpt")
  flags = ("--config.logging.tensorboard=false", "--config.eval.every=2")
  proc = run_main("experiments/sample_cpu.py:tiny", workdir, *flags, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (workdir / "main.log").write_text(proc.stderr)
  return workdir


def test_the_main_job_ends_with_a_duplex_report_on_held_out_conversations(tiny_checkpoint):
  log = (tiny_checkpoint / "main.log").read_text()
  assert "duplex report at step 2 (held-out conversations)" in log
  assert "user: " in log and "reference: " in log and "takeover_rate" in log
  rows = [json.loads(line) for line in (tiny_checkpoint / "metrics.jsonl").read_text().splitlines()]
  (duplex,) = [r for r in rows if "duplex/takeover_rate" in r]
  assert duplex["step"] == 2 and duplex["duplex/conversations"] == 1 and duplex["duplex/answers_expected"] > 0


def test_duplex_cli_scores_held_out_conversations_with_video(tiny_checkpoint, tmp_path):
  out = tmp_path / "duplex"
  data = "data/sample/heldout/video,data/sample/heldout/conversations"
  cmd = [sys.executable, "-m", "tmlx.eval", "duplex", f"--checkpoint={tiny_checkpoint}", f"--data={data}"]
  proc = subprocess.run(
    [*cmd, "--conversations=2", f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 conversations" in proc.stdout and "takeover_rate" in proc.stdout and "mel_error_vs_mean" in proc.stdout
  summary = json.loads((out / "summary.json").read_text())
  assert summary["conversations"] == 2 and summary["checkpoint_step"] == 2 and summary["mel_error_vs_mean"] > 0
  (video,) = json.loads((ROOT / "data/sample/heldout/video/manifest.json").read_text())["episodes"]
  first = json.loads((out / f"{video['id']}.json").read_text())
  assert first["turns"] and all("model_answer" in t for t in first["turns"] if t["expects_answer"])
  assert (out / f"{video['id']}.png").stat().st_size > 10_000
  bad = subprocess.run([*cmd[:-1], "--data=nowhere"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--data nowhere: no episode dataset here" in bad.stderr


def test_stream_cli_runs_a_recording_with_video_in_simulated_real_time(tiny_checkpoint, tmp_path):
  rng = np.random.default_rng(0)
  seconds = 2.0
  t = np.arange(int(16000 * seconds)) / 16000
  speech = (0.3 * np.sin(2 * np.pi * 220 * t) * (rng.random(t.size) > 0.5)).astype(np.float32)
  wav = tmp_path / "conversation.wav"
  sf.write(wav, np.stack([speech, np.zeros_like(speech)], axis=1), 16000)  # stereo: channel 0 is the user
  frames = rng.integers(0, 255, (10, 80, 80, 3), dtype=np.uint8)
  clip = tmp_path / "clip.mp4"
  video.render_mp4(clip, frames, fps=5.0, audio=speech[None])
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "tmlx.stream", f"--checkpoint={tiny_checkpoint}", f"--input={wav}", f"--video={clip}"]
  proc = subprocess.run([*cmd, f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "micro-turn latency p50" in proc.stdout and "real-time factor" in proc.stdout
  timeline = json.loads((out / "timeline.json").read_text())
  assert timeline["summary"]["micro_turns"] == 10 and len(timeline["micro_turns"]) == 10
  assert np.load(out / "mel.npy").shape == (160, 80)
  audio, rate = sf.read(out / "speech.wav")
  assert rate == 16000 and audio.size > 0.9 * 16000 * seconds and np.isfinite(audio).all()
  assert (out / "timeline.png").stat().st_size > 10_000


def test_eval_cli_reports_per_stream_losses_and_ablations_change_them(tiny_checkpoint, tmp_path):
  out = tmp_path / "eval.json"
  cmd = [sys.executable, "-m", "tmlx.eval", f"--checkpoint={tiny_checkpoint}", "--batches=2", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  base = json.loads(out.read_text())
  assert base["checkpoint_step"] == 2 and base["text_targets"] > 0 and base["audio_targets"] > 0
  assert all(np.isfinite(base[k]) for k in ("text_loss", "flow_loss", "sampled_mel_mse"))
  # The same rows in this process, on its 8-device mesh, with each ablation.
  run = lambda *flags: tmlx_eval.evaluate(
    tmlx_eval.parse_args([f"--checkpoint={tiny_checkpoint}", "--batches=2", *flags])
  )
  same = run()
  assert same["text_loss"] == pytest.approx(base["text_loss"], rel=1e-3)  # other mesh: bf16 reduction order
  assert run("--zero=user_audio,text")["text_loss"] != pytest.approx(same["text_loss"], rel=1e-4)
  assert run("--disable_experts=0,1,2")["text_loss"] != pytest.approx(same["text_loss"], rel=1e-4)
  fewer = run("--flow_steps=2")
  assert fewer["flow_loss"] == pytest.approx(same["flow_loss"]) and fewer["sampled_mel_mse"] != same["sampled_mel_mse"]
  with pytest.raises(SystemExit, match="--zero: unknown 'audio'"):
    run("--zero=audio")
