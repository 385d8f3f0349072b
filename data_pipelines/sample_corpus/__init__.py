"""Generates a small, real sample corpus: spoken two-speaker conversations, videos and text documents.

    python -m data_pipelines.sample_corpus --out=DIR [--seed=0] [--conversations=12] [--videos=3]
        [--texts=10] [--heldout=4] [--seconds=10] [--frame_size=80] [--raw=RAW_DIR]

Conversations follow a small seeded script of question-answer exchanges (greetings, colours,
arithmetic, city facts, the time and the weather, goodbyes) with turn gaps, occasional overlaps,
mid-turn pauses (the user hesitates for 0.5-1 s), backchannels ("mm-hmm", "yeah") and barge-ins.
Asking for the time or the weather makes the model send a background call (`bg_calls`, e.g.
"weather in Paris?"), say "Let me check." or "One moment.", and say the answer once the result
(`bg_results`, e.g. "sunny 21C") has arrived 0.4-1.0 s after the call; some questions are typed
(`typed_text`) rather than spoken. Every reply is a function of what the user said, and the model
reacts (answers, calls, backchannels, stops when cut off) no sooner than 200 ms after what it
reacts to: the task is well posed for a causal model that hears in 200 ms micro-turns, and a reply
can be scored against the recorded one (`python -m tmlx.eval duplex`). Speech is synthesized word
by word with espeak-ng (one call per distinct word and voice, cached) and placed on the timeline,
so every word's start and end time is exact. The user's voice varies by conversation; the model's
voice is fixed.

The raw inputs are written to RAW_DIR (a temporary directory by default) in the formats that
`data_pipelines.build` reads: stereo FLAC or paired WAV files (some at 22,050 Hz) with JSON, TextGrid
or CTM transcripts; MP4 videos (a disc in the colour being talked about, and one level bar per
speaker) with a stereo audio track; .txt notes and a .jsonl file of chats. The builders then
write DIR/conversations, DIR/video and DIR/text, and the held-out DIR/heldout/conversations (and
one held-out video in DIR/heldout/video), drawn from random streams of their own; their summaries
are printed.

For more data, raise --conversations, --videos, --texts, --heldout or --seconds (per
conversation), and vary --seed. Output is deterministic given the flags. The defaults keep the
datasets under 4.5 MB (the committed sample in data/sample). espeak-ng (Debian package
`espeak-ng`) is needed only to generate; reading the corpus needs nothing beyond the project's
dependencies.

    script     what is said: the vocabulary, the script of a conversation, the text documents
    speech     how it sounds and when: espeak-ng word clips on a timeline, rendered
    raw        the raw inputs, written in the formats the builders read
    corpus     `generate`: raw inputs, then the built datasets
    cli        the flags, and `main(argv)`, the command line run in-process
"""

from data_pipelines.sample_corpus.cli import main
from data_pipelines.sample_corpus.corpus import generate

__all__ = ["generate", "main"]
