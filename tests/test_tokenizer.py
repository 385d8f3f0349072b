"""SentencePiece tokenizer: the training command, the reserved special ids, round trips and config errors."""

import pathlib
import random
import subprocess
import sys

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data_pipelines import episode
from data_pipelines.contract import NUM_RESERVED, SPECIAL_TOKENS
from data_pipelines.tokenizer import (
  MAX_LINE_BYTES,
  ByteTokenizer,
  SentencePieceTokenizer,
  make_tokenizer,
  training_sentences,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 400
_WORDS = (
  "the a model user speaks listens quickly slowly audio video token text turn pause hello world train "
  "data weather today tomorrow call result search music play stop yes no maybe café naïve"
).split()
SENTENCES = [
  "hello world, the model listens.",
  "  two  spaces and a tab\tinside ",
  "Zürich, 東京 and emoji 🙂 are rare",
  "unseen: qzxv ŁÓDŹ",
]


def _lines(n: int, seed: int) -> list[str]:
  rng = random.Random(seed)
  return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def _train_cli(tmp_path: pathlib.Path, *inputs: pathlib.Path, name: str = "tok") -> subprocess.CompletedProcess:
  prefix = tmp_path / name
  cmd = [sys.executable, "-m", "data_pipelines.tokenizer", "train", "--input", *map(str, inputs)]
  cmd += ["--vocab_size", str(VOCAB), "--out", str(prefix)]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _model_proto(path: pathlib.Path):
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(path.read_bytes())
  return proto


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One model trained by the CLI on a text file plus an episode dataset directory."""
  tmp = tmp_path_factory.mktemp("tok")
  text = tmp / "corpus.txt"
  text.write_text("\n".join(_lines(300, seed=0)) + "\n")
  eps = []
  for k, line in enumerate(_lines(20, seed=1)):
    words = [episode.Word(0.5 * j, 0.5 * j + 0.4, w) for j, w in enumerate(line.split())]
    eps.append(
      episode.Episode(
        id=f"ep{k}",
        duration=10.0,
        model_words=words,
        user_words=[episode.Word(0.1, 0.3, "weather")],
        typed_text=[episode.Event(1.0, "typed <user_text> words")],
        bg_calls=[episode.Event(2.0, 'search("weather tomorrow")')],
        bg_results=[episode.Event(3.0, "result: sunny\nsecond line")],
      )
    )
  episode.write_dataset(eps, tmp / "episodes")
  proc = _train_cli(tmp, text, tmp / "episodes")
  assert proc.returncode == 0, proc.stderr
  return tmp, proc


def test_cli_trains_the_requested_vocab_and_reports_it(trained):
  tmp, proc = trained
  model = tmp / "tok.model"
  assert model.is_file() and (tmp / "tok.vocab").is_file()
  assert f"vocab_size {VOCAB}" in proc.stdout and str(model) in proc.stdout
  tok = make_tokenizer(f"sentencepiece:{model}")
  assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == VOCAB
  # The episode directory's text was trained on: its bg_call text is a handful of pieces, not bytes.
  assert len(tok.encode('search("weather tomorrow")')) < len('search("weather tomorrow")') // 2


def test_training_is_deterministic(trained, tmp_path):
  tmp, _ = trained
  proc = _train_cli(tmp_path, tmp / "corpus.txt", tmp / "episodes")
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "tok.vocab").read_text() == (tmp / "tok.vocab").read_text()
  # The .model files differ only in the output prefix that the recorded training options name.
  a, b = (_model_proto(d / "tok.model") for d in (tmp, tmp_path))
  assert a.trainer_spec.model_prefix != b.trainer_spec.model_prefix
  a.trainer_spec.model_prefix = b.trainer_spec.model_prefix = ""
  assert a.SerializeToString() == b.SerializeToString()


def test_round_trip_and_specials_match_the_byte_tokenizer(trained):
  tok = SentencePieceTokenizer(trained[0] / "tok.model")
  byte = ByteTokenizer()
  for name in SPECIAL_TOKENS:
    assert tok.special(name) == byte.special(name) == SPECIAL_TOKENS.index(name)
  assert tok.special("<pad>") == 0 and tok.special("<mt>") == 1
  with pytest.raises(KeyError, match="<nope>"):
    tok.special("<nope>")
  for s in SENTENCES + _lines(5, seed=7):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert min(ids) >= NUM_RESERVED and max(ids) < tok.vocab_size
  # Specials decode to their names and PAD to nothing, as with ByteTokenizer.
  mt, eot = tok.special("<mt>"), tok.special("<eot>")
  ids = [0] + tok.encode("hello") + [mt] + tok.encode("world") + [eot, 0, 0]
  assert tok.decode(ids) == "hello<mt>world<eot>"
  assert byte.decode([0] + byte.encode("hello") + [mt] + byte.encode("world") + [eot, 0]) == "hello<mt>world<eot>"


def test_special_names_in_text_are_never_special_ids(trained):
  tok = SentencePieceTokenizer(trained[0] / "tok.model")
  for name in SPECIAL_TOKENS + ("<reserved_9>", "<unk>"):
    text = f"user typed {name} here"
    ids = tok.encode(text)
    assert all(i >= NUM_RESERVED for i in ids), (name, ids)
    assert tok.decode(ids) == text


def test_make_tokenizer_choices_and_errors(trained):
  assert isinstance(make_tokenizer("byte"), ByteTokenizer)
  for bad in ("bytes", "sentencepiece", "sentencepiece:", "spm:x.model", ""):
    with pytest.raises(ValueError, match=r"data\.tokenizer .*'byte'.*'sentencepiece:PATH'"):
      make_tokenizer(bad)
  with pytest.raises(FileNotFoundError, match="missing.model"):
    make_tokenizer(f"sentencepiece:{trained[0] / 'missing.model'}")


def test_models_without_the_reserved_layout_are_rejected(tmp_path):
  corpus = _lines(200, seed=3)
  common = dict(vocab_size=120, model_type="bpe", minloglevel=2, num_threads=1)
  # Default layout: <unk>, <s>, </s> at 0..2, so every special id would shift.
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "plain"), **common)
  with pytest.raises(ValueError, match=r"plain\.model: id 0 is '<unk>', want '<pad>'"):
    SentencePieceTokenizer(tmp_path / "plain.model")
  # Right names, but as user-defined symbols, which encode() would produce from literal text.
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus),
    model_prefix=str(tmp_path / "user"),
    pad_id=0,
    unk_id=len(SPECIAL_TOKENS),
    bos_id=-1,
    eos_id=-1,
    user_defined_symbols=list(SPECIAL_TOKENS[1:]),
    **common,
  )
  with pytest.raises(ValueError, match=r"user\.model: id 1 \('<mt>'\) is a text .*want a control piece"):
    SentencePieceTokenizer(tmp_path / "user.model")
  # Specials in place but no reserved placeholders: id 9 would be text, which a future special needs.
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus),
    model_prefix=str(tmp_path / "short"),
    pad_id=0,
    unk_id=len(SPECIAL_TOKENS),
    bos_id=-1,
    eos_id=-1,
    control_symbols=list(SPECIAL_TOKENS[1:]),
    **common,
  )
  with pytest.raises(ValueError, match=r"short\.model: id 9 \('<unk>'\) is an unknown piece"):
    SentencePieceTokenizer(tmp_path / "short.model")


def test_cli_errors_name_the_problem(tmp_path):
  proc = _train_cli(tmp_path, tmp_path / "absent.txt")
  assert proc.returncode == 2 and "absent.txt" in proc.stderr
  (tmp_path / "notaset").mkdir()
  proc = _train_cli(tmp_path, tmp_path / "notaset")
  assert proc.returncode == 2 and "manifest.json" in proc.stderr
  (tmp_path / "empty.txt").write_text("\n \n")
  proc = _train_cli(tmp_path, tmp_path / "empty.txt")
  assert proc.returncode == 2 and "no text" in proc.stderr


def test_training_sentences_cover_episode_text_and_wrap_long_lines(trained, tmp_path):
  tmp, _ = trained
  first = list(training_sentences([tmp / "episodes"]))[:6]
  model_line = " ".join(_lines(20, seed=1)[0].split())
  want = [
    "weather",
    model_line,
    "typed <user_text> words",
    'search("weather tomorrow")',
    "result: sunny",
    "second line",
  ]
  assert first == want
  long = tmp_path / "long.txt"
  words = [f"w{i}" for i in range(3000)]
  long.write_text(" ".join(words) + "\n" + "x" * (MAX_LINE_BYTES + 10) + "\n")
  lines = list(training_sentences([long]))
  assert all(len(s.encode()) <= MAX_LINE_BYTES for s in lines) and len(lines) >= 3
  assert " ".join(lines[:-2]).split() == words and "".join(lines[-2:]) == "x" * (MAX_LINE_BYTES + 10)
