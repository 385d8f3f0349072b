"""Text tokenizers behind one interface (MODEL_SPEC.md §2, Text).

Every tokenizer reserves ids 0..15 for the special tokens (`data_pipelines.contract.SPECIAL_TOKENS`:
PAD first, so that 0 means "no token"; ids past the named specials are held for future ones), so
`special(name)` is `contract.special_id(name)` whichever tokenizer a run uses. `make_tokenizer`
builds one from the config field `data.tokenizer`:

    "byte"                     ByteTokenizer: needs no training; ids 16..271 are the 256 byte values
    "sentencepiece:PATH"       SentencePieceTokenizer: a model trained by the command below

Training a SentencePiece model with the reserved layout (ids 0..15 specials and placeholders, 16
`<unk>`, 17..272 byte fallback, then the learned pieces):

    python -m data_pipelines.tokenizer train --input PATH [PATH ...] --vocab_size N --out PREFIX \
        [--model_type bpe|unigram] [--num_threads 1]

Each PATH is a UTF-8 text file (one sentence per line) or an episode dataset directory (one holding
`manifest.json`), whose text is every episode's user words and model words (joined per speaker),
typed text, background calls and background results. It writes PREFIX.model and PREFIX.vocab.
Training reads no network and is deterministic for given inputs, options and thread count.
Normalization is the identity and whitespace is kept, so `decode(encode(text)) == text`.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Protocol

from data_pipelines.contract import NUM_RESERVED, SPECIAL_TOKENS, special_id

RESERVED_PIECES = SPECIAL_TOKENS + tuple(f"<reserved_{i}>" for i in range(len(SPECIAL_TOKENS), NUM_RESERVED))
MAX_LINE_BYTES = 4096  # training sentences are wrapped to this many UTF-8 bytes
_TRAIN_HINT = "`python -m data_pipelines.tokenizer train` (module docstring)"
TOKENIZER_CHOICES = "'byte' or 'sentencepiece:PATH' (a .model file from `python -m data_pipelines.tokenizer train`)"


class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...

  def special(self, name: str) -> int: ...


def _special_text(i: int) -> str:
  """The text a special id decodes to: its name, or nothing for PAD and unused reserved ids."""
  return SPECIAL_TOKENS[i] if 0 < i < len(SPECIAL_TOKENS) else ""


class ByteTokenizer:
  """UTF-8 bytes offset by the reserved special ids."""

  vocab_size = NUM_RESERVED + 256

  def encode(self, text: str) -> list[int]:
    return [NUM_RESERVED + b for b in text.encode("utf-8")]

  def decode(self, ids: list[int]) -> str:
    out = bytearray()
    for i in ids:
      if i >= NUM_RESERVED:
        out.append(i - NUM_RESERVED)
      else:
        out.extend(_special_text(i).encode())
    return out.decode("utf-8", errors="replace")

  def special(self, name: str) -> int:
    return special_id(name)


class SentencePieceTokenizer:
  """A SentencePiece model whose ids 0..15 are the reserved specials, checked when it loads.

  Specials are control pieces, so `encode` never emits an id below 16 for any text (a literal
  "<mt>" in the text is encoded as ordinary pieces). `decode` writes specials as their names and
  drops PAD and unused reserved ids, as ByteTokenizer does.
  """

  def __init__(self, model_path: str | os.PathLike):
    import sentencepiece as spm

    self.path = str(model_path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"{self.path}: no SentencePiece model here; train one with {_TRAIN_HINT}")
    self._sp = spm.SentencePieceProcessor(model_file=self.path)
    self.vocab_size = self._sp.get_piece_size()
    _check_reserved(self._sp, self.path)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: list[int]) -> str:
    out, run = [], []
    for i in ids:
      i = int(i)
      if i >= NUM_RESERVED:
        run.append(i)
        continue
      if run:
        out.append(self._sp.decode(run))
        run = []
      out.append(_special_text(i))
    if run:
      out.append(self._sp.decode(run))
    return "".join(out)

  def special(self, name: str) -> int:
    return special_id(name)


def _check_reserved(sp, path: str) -> None:
  """Raises ValueError unless ids 0..15 are control pieces and the first ones are the specials in order."""
  if sp.get_piece_size() <= NUM_RESERVED:
    raise ValueError(f"{path}: {sp.get_piece_size()} pieces; a model needs ids 0..{NUM_RESERVED - 1} reserved")
  for i in range(NUM_RESERVED):
    piece = sp.id_to_piece(i)
    if i < len(SPECIAL_TOKENS) and piece != SPECIAL_TOKENS[i]:
      raise ValueError(
        f"{path}: id {i} is {piece!r}, want {SPECIAL_TOKENS[i]!r}; special ids must match ByteTokenizer "
        f"({', '.join(f'{j}={s}' for j, s in enumerate(SPECIAL_TOKENS))}). Train the model with {_TRAIN_HINT}"
      )
    if not sp.is_control(i):
      kinds = {"an unknown": sp.is_unknown, "a byte": sp.is_byte, "an unused": sp.is_unused}
      kind = next((k for k, is_kind in kinds.items() if is_kind(i)), "a text (normal or user-defined)")
      raise ValueError(
        f"{path}: id {i} ({piece!r}) is {kind} piece, want a control piece: ids 0..{NUM_RESERVED - 1} are "
        f"reserved and must never be produced from text. Train the model with {_TRAIN_HINT}"
      )


def make_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer named by the config field `data.tokenizer`: 'byte' or 'sentencepiece:PATH'."""
  if spec == "byte":
    return ByteTokenizer()
  kind, sep, path = spec.partition(":")
  if kind == "sentencepiece" and sep and path:
    return SentencePieceTokenizer(path)
  raise ValueError(f"data.tokenizer is {spec!r}; choices: {TOKENIZER_CHOICES}")


# Training.


def _wrap(text: str, limit: int = MAX_LINE_BYTES) -> Iterator[str]:
  """Splits text into lines, and lines longer than `limit` UTF-8 bytes at spaces (or anywhere)."""
  for line in text.splitlines():
    if not line.strip():
      continue
    if len(line.encode()) <= limit:
      yield line
      continue
    cur, size = [], -1
    for word in line.split(" "):
      n = len(word.encode())
      if cur and size + 1 + n > limit:
        yield " ".join(cur)
        cur, size = [], -1
      while n > limit:  # one word longer than a line: cut it by characters
        head = word.encode()[:limit].decode("utf-8", errors="ignore")
        yield head
        word = word[len(head) :]
        n = len(word.encode())
      cur.append(word)
      size += 1 + n
    if cur and " ".join(cur).strip():
      yield " ".join(cur)


def _episode_texts(directory: pathlib.Path) -> Iterator[str]:
  from data_pipelines.episode import EpisodeReader

  reader = EpisodeReader(directory)
  for i in range(len(reader)):
    ep = reader.read(i)
    for words in (ep.user_words, ep.model_words):
      if words:
        yield " ".join(w.text for w in words)
    for events in (ep.typed_text, ep.bg_calls, ep.bg_results):
      for e in events:
        yield e.text


def _check_inputs(paths: Iterable[str | os.PathLike]) -> list[pathlib.Path]:
  from data_pipelines.episode import MANIFEST

  out = [pathlib.Path(p) for p in paths]
  for p in out:
    if p.is_dir() and not (p / MANIFEST).is_file():
      raise FileNotFoundError(f"{p}: a directory input must be an episode dataset (it has no {MANIFEST})")
    if not p.exists():
      raise FileNotFoundError(f"{p}: no such text file or episode dataset directory")
  return out


def _file_lines(path: pathlib.Path) -> Iterator[str]:
  with open(path, encoding="utf-8") as f:
    try:
      yield from f
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def training_sentences(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
  """The training sentences of text files and episode dataset directories, in input order."""
  for p in _check_inputs(paths):
    for text in _episode_texts(p) if p.is_dir() else _file_lines(p):
      yield from _wrap(text)


def train(
  inputs: list[str | os.PathLike],
  vocab_size: int,
  out_prefix: str | os.PathLike,
  model_type: str = "bpe",
  num_threads: int = 1,
) -> SentencePieceTokenizer:
  """Trains a SentencePiece model with the reserved layout; writes PREFIX.model/.vocab and loads it."""
  import sentencepiece as spm

  minimum = NUM_RESERVED + 1 + 256  # reserved, <unk>, byte fallback
  if vocab_size <= minimum:
    raise ValueError(f"vocab_size {vocab_size} is too small: {minimum} ids are reserved, unknown and byte pieces")
  _check_inputs(inputs)
  counted, failed = [0], []

  def sentences():
    try:
      for s in training_sentences(inputs):
        counted[0] += 1
        yield s
    except Exception as e:  # the trainer would turn it into a RuntimeError holding only its text
      failed.append(e)
      raise

  prefix = pathlib.Path(out_prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  spm.set_random_generator_seed(0)
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=sentences(),
      model_prefix=str(prefix),
      model_type=model_type,
      vocab_size=vocab_size,
      pad_id=0,
      pad_piece=SPECIAL_TOKENS[0],
      control_symbols=list(RESERVED_PIECES[1:]),  # control: never matched in text, unlike user_defined_symbols
      unk_id=NUM_RESERVED,
      bos_id=-1,
      eos_id=-1,
      byte_fallback=True,
      # Numbers digit by digit, so that a model can copy and read any number, not only the ones
      # frequent enough to get a piece ("06:52" was one piece, and an unseen time none).
      split_digits=True,
      # tmlx encodes text in pieces that carry their own spaces (a model's word is " word" in the
      # micro-turn it starts in): a dummy prefix would add a "▁" to each piece, a token per word.
      add_dummy_prefix=False,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      max_sentence_length=MAX_LINE_BYTES,
      num_threads=num_threads,
      minloglevel=1,
    )
  except RuntimeError as e:
    if failed:
      raise failed[0] from None
    if counted[0] == 0:
      raise ValueError(f"no text in the training inputs {[str(p) for p in inputs]}") from None
    raise ValueError(f"SentencePiece training failed on {counted[0]} sentences: {e}") from None
  return SentencePieceTokenizer(f"{prefix}.model")


# The command line. Its flags are defined when it runs, not at import: serving and the data
# pipeline import this module, next to commands with flags of the same names.

PROG = "python -m data_pipelines.tokenizer"


def define_flags(fv) -> None:
  from absl import flags

  flags.DEFINE_multi_string(
    "input",
    None,
    "Text files and/or episode dataset directories; the arguments after `--input PATH` that are not flags are "
    "inputs too, so `--input a b` names two.",
    required=True,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "vocab_size", None, "Total ids, including the 273 reserved/byte ids.", required=True, flag_values=fv
  )
  flags.DEFINE_string(
    "out", None, "Output prefix: writes PREFIX.model and PREFIX.vocab.", required=True, flag_values=fv
  )
  flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model type.", flag_values=fv)
  flags.DEFINE_integer("num_threads", 1, "Trainer threads; the model depends on this number.", flag_values=fv)


def run(fv, args: list[str]) -> int:
  """`train`: trains the model the parsed command line asks for (`train`) and says how to use it."""
  from tmlx import cli

  if not args or args[0] != "train":
    cli.fail(PROG, f"the first argument is the command, 'train'; got {repr(args[0]) if args else 'nothing'}")
  try:
    tok = train([*fv.input, *args[1:]], fv.vocab_size, fv.out, fv.model_type, fv.num_threads)
  except (ValueError, OSError) as e:
    cli.fail(PROG, str(e))
  print(f"vocab_size {tok.vocab_size}: {tok.path} (use data.tokenizer=sentencepiece:{tok.path})")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs `python -m data_pipelines.tokenizer ARGS` in this process on `argv` (ARGS; default
  sys.argv[1:]); returns the exit status."""
  from tmlx import cli

  return cli.call(PROG, define_flags, run, argv)


if __name__ == "__main__":
  from tmlx import cli

  cli.app_main(PROG, define_flags, run)
