"""Full-duplex behaviour of a checkpoint on held-out conversations.

  python -m tmlx.eval duplex --checkpoint WORKDIR --data DIR[,DIR...] [--out DIR] [--conversations N]
      [--step N] [--seed 0] [--temperature T] [--top_p P] [--audio_temperature TAU] [--audio_steps N]
      [--window W]

Each conversation with audio in the episode datasets of --data (built by `python -m data_pipelines.build`)
goes through a streaming `tmlx.stream.Session` in simulated real time. In micro-turn t the session hears
window t (200 ms) of the user channel, the video frame and typed text whose times fall in window t, and
the background results that have arrived; what it writes in O_t is played in window t+1. A recorded
worker answers the model's `<bg_call>`s: a call is matched to the conversation's recorded call nearest in
time (within `CALL_MATCH_S`), and its recorded result arrives as many windows after the model's call as it
arrived after the recorded one; a call with no recorded counterpart gets no answer, and no result arrives
unless the model calls. The user's side is the recording: it does not wait for the model.

The scores compare the session with the conversation's own word times and events (seconds):

- Words. The model's words are its text stream without `<bg_call>` spans, split at whitespace and
  wherever a micro-turn without text comes between two characters; a word's time is the start of
  the window it is played in, (t+1)·0.2 s for a word begun in O_t. The reference model's words are
  timed the same way from the alignment of its recorded words into micro-turns
  (`data_pipelines.align`), so a replay of the reference scores as the reference. Words are compared
  lower-cased without punctuation. Model voice: a frame (12.5 ms) is voiced when its mean normalized
  log-mel is above `VOICED_LEVEL`; a window is voiced when at least `VOICED_FRAMES` of its 16 frames are.
- Utterances. A speaker's consecutive words whose times are at most `UTTERANCE_GAP_S` apart form an
  utterance, which lasts from its first word's time to `WORD_S` after its last word's. An utterance is a
  backchannel when it has at most 2 words, all in `BACKCHANNELS`.
- User turns. The user's spoken words form IPUs (inter-pausal units: runs of words with gaps below
  `IPU_GAP_S`); a typed text is an IPU of no length at its time. Backchannel IPUs are left out; two
  consecutive IPUs belong to one user turn unless the reference model begins a non-backchannel utterance,
  or writes a background call, between the first one's start and the second one's. A turn expects an
  answer when the reference model does so after the turn's last IPU starts. The gaps between the IPUs of a
  turn are its mid-turn pauses. A turn's response window runs from its end (its last word's end) to
  `GRACE_S` after the next turn starts (or to the end of the conversation).

Metrics (pooled over all conversations; each conversation's JSON has them per turn too):

- `takeover_rate`: of the turns that expect an answer, the fraction in whose response window the model
  says a non-backchannel word (the takeover rate of Full-Duplex-Bench);
- `response_latency_s`: for each such turn, the time of that first word minus the turn's end;
  `audio_latency_s`: the start of the model's first voiced run (`VOICED_RUN` frames) that begins in the
  response window, minus the turn's end (p50 and p90 of both are reported);
- `answer_word_accuracy`: 1 - (word edit distance / reference words) over every answer pooled, at least
  0: the model's non-backchannel words in each expecting turn's response window against the reference's;
- `false_takeover_rate`: the model's non-backchannel utterance onsets during user turns (from a turn's
  start to its end: over the user's speech or in a mid-turn pause), per user turn;
- `barge_in_yield_s`: at each user turn that starts while the model is in a non-backchannel utterance, the
  time from the turn's start to that utterance's end (p50; `barge_ins` counts them);
- `bg_call_rate`: of the turns whose reference writes a background call (from the turn's start to the
  end of its response window), the fraction where the model writes one there too; `bg_answer_rate`: the
  fraction where the model's words after its result arrived (played from the window after) contain every
  result word: the reference's words after its result arrived that the conversation had not used before;
- `voiced_agreement`: over every window of every conversation, the fraction where the model's audio and
  the reference model channel agree on voiced or silent;
- `mel_error_vs_mean`: teacher-forced (the reference's text and audio are fed back instead of the
  model's, and its background results arrive at their recorded times), the mean squared error of the mel
  that the flow head samples for each AUDIO_OUT position against the reference mel, divided by the error
  of predicting every frame as the per-channel mean of the same reference frames.

Writes into --out: `<episode id>.json` (turns, words, events, metrics) and `<episode id>.png` (reference
and model turns, background calls and results, voiced windows on one time axis) per conversation, and
`summary.json`. Prints the summary.

The parts: `tmlx.eval.conversations` (the held-out conversations),
`tmlx.eval.speakers` (agents, the recorded worker, the simulated-real-time run), `tmlx.eval.scoring`
(the scores above), `tmlx.eval.evaluation` (`evaluate`, `evaluate_checkpoint`, `TrainingProbe`) and
`tmlx.eval.report` (the outputs and logs); this module holds the command line and re-exports what
callers use (`__all__`).
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from tmlx import cli
from tmlx.eval.conversations import load_conversations
from tmlx.eval.evaluation import STREAM_OVERRIDES, TrainingProbe, evaluate, evaluate_checkpoint
from tmlx.eval.report import format_summary, report, write_outputs
from tmlx.eval.scoring import user_turns
from tmlx.eval.speakers import ReplayAgent, Said, SilentAgent
from tmlx.stream.config import define_sampling_flags

# What callers reach through this module (the rest has its home in the modules its docstring names).
__all__ = [
  "ReplayAgent",
  "Said",
  "SilentAgent",
  "TrainingProbe",
  "evaluate",
  "evaluate_checkpoint",
  "load_conversations",
  "main",
  "report",
  "user_turns",
]

# The command line (module docstring); its flags are defined when it runs, not at import.

PROG = "python -m tmlx.eval duplex"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("checkpoint", None, "A workdir or checkpoint directory.", required=True, flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
  flags.DEFINE_string("data", None, "Held-out episode datasets, comma separated.", required=True, flag_values=fv)
  flags.DEFINE_integer("conversations", None, "Evaluate only the first N conversations.", flag_values=fv)
  flags.DEFINE_string("out", None, "Directory for per-conversation JSON/PNG and summary.json.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "The session's sampling seed.", flag_values=fv)
  define_sampling_flags(fv)
  flags.DEFINE_integer("window", None, "Attention window of the session (config.stream).", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
  """`evaluate_checkpoint` with the parsed command line's flags; prints the summary and writes the
  outputs into --out. A missing checkpoint or dataset ends it in one line."""
  if args:
    cli.fail(PROG, f"takes no positional arguments; got {args}")
  data = [d.strip() for d in fv.data.split(",") if d.strip()]
  options = {name: fv[name].value for name in ("step", "conversations", "seed", *STREAM_OVERRIDES)}
  with cli.one_line_exits(PROG):
    result = evaluate_checkpoint(fv.checkpoint, data, **options)
  print(f"checkpoint step {result.summary['checkpoint_step']}: " + format_summary(result.summary))
  if fv.out:
    write_outputs(result, fv.out)
    print(f"wrote {fv.out}/summary.json and a JSON and PNG per conversation")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `python -m tmlx.eval duplex ARGS` in this process on `argv` (ARGS; default
  sys.argv[1:]); returns the exit status."""
  return cli.call(PROG, define_flags, run, argv)


if __name__ == "__main__":
  cli.app_main(PROG, define_flags, run)
