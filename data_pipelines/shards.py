"""A dataset build as independent shards: plan, write each shard, merge.

`plan` lists a build's items and gives each one its shard by a hash of its episode id
(`shard_of`), never by when it was built, so a shard's contents are a function of the inputs alone:
the items whose ids hash to it, in input order. `write_shard` builds those items one at a time and
streams their records into the shard's ArrayRecord file, then writes the shard's part, a small
JSON file under `build/` beside the shards: its episodes, its skips by reason, its warnings by kind,
the statistics of its episodes (`data_pipelines.stats`), the SHA-256 (and MD5) of the shard, and
the digest of everything the shard was built from (`Plan.digest`: its items, the versions of their
files and transcripts, the builder's options, the build code's and codec libraries' versions).
`merge` joins the parts, in shard order, into `manifest.json`; the dataset is complete when that
file is there (a build removes an earlier one before it writes a shard).

Any process may write any shard, in any order, under temporary names of its own: the same inputs
give byte-identical shards and manifest however many workers build them (`data_pipelines.beam`
runs `write_shard` on Apache Beam; `build_in_process` runs it in a loop). A rerun reuses every
shard whose part has the digest the plan expects and whose file still has the checksum its part
records (`is_complete`), so a build that was killed resumes where it stopped and ends as an
uninterrupted one would.

The output may be a local directory or an object-store URL: a shard is written to a local
temporary file first (ArrayRecord cannot write to object storage) and copied when complete.
Memory holds one episode's media, never a shard's or the corpus's; what grows with the corpus is
the listing and the manifest's entries (a few hundred bytes per episode).
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import functools
import glob
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable

from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines import stats, transcripts
from data_pipelines.builders import Builder, Item
from data_pipelines.builders.policy import Policy
from data_pipelines.episode import MANIFEST, SCHEMA_VERSION, WRITER_OPTIONS, EpisodeInfo, episode_records
from data_pipelines.episode.manifest import shard_name
from data_pipelines.episode.records import DEFAULT_CHUNK_SECONDS
from tmlx import paths

log = logging.getLogger(__name__)

PARTS = "build"  # the subdirectory of the shards' parts
_SHARD_FILES = "episodes-*-of-*.array_record"
_TEMPORARY = "episodes-*-of-*.array_record.*tmp"  # `_temporary` names, and ".tmp" ones of earlier builds


# Bump when what a builder writes for the same inputs changes (a fix in a builder or the record
# format), so that a rerun does not keep shards the older code wrote.
BUILD_VERSION = 1
# The libraries that decode and encode what a shard holds: their versions are part of its digest.
_LIBRARIES = ("array-record", "av", "numpy", "soundfile", "soxr")


def shard_of(episode_id: str, shards: int) -> int:
  """The shard of an episode: the first 8 bytes of the SHA-256 of its id, modulo `shards`."""
  return int.from_bytes(hashlib.sha256(episode_id.encode("utf-8", "surrogateescape")).digest()[:8], "big") % shards


@functools.cache
def _versions() -> dict[str, str]:
  return {"tmlx_build": str(BUILD_VERSION), **{name: importlib.metadata.version(name) for name in _LIBRARIES}}


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a build writes to `out`: `items[s]` are shard s's items, in input order, and
  `signatures[s]` the versions of each one's `Item.versioned` files. A worker's plan holds only the
  items of the shard it writes (`without_items`, then `load_items`)."""

  builder: Builder
  out: str
  items: tuple[tuple[Item, ...], ...]
  signatures: tuple[tuple[tuple[str, ...], ...], ...]
  on_error: str = "skip"
  chunk_seconds: float = DEFAULT_CHUNK_SECONDS

  @property
  def shards(self) -> int:
    return len(self.items)

  def name(self, s: int) -> str:
    return shard_name(s, self.shards)

  def part(self, s: int) -> str:
    return paths.join(self.out, PARTS, self.name(s).removesuffix(".array_record") + ".json")

  def without_items(self) -> Plan:
    """This plan with no shard's items: what a worker starts from (`load_items`)."""
    return dataclasses.replace(self, items=((),) * self.shards, signatures=((),) * self.shards)

  def rows(self, s: int) -> list[list]:
    """Shard s's items, each as [its fields, its files' versions]: what `digest` hashes and `save_items` saves."""
    return [[dataclasses.astuple(it), list(sig)] for it, sig in zip(self.items[s], self.signatures[s])]

  def digest(self, s: int) -> str:
    """What shard s is built from, hashed: the builder and its options, the code and libraries
    that write it, the record format, its items and their files' versions."""
    what = {
      "builder": self.builder.fingerprint(),
      "versions": _versions(),
      "schema": SCHEMA_VERSION,
      "chunk_seconds": self.chunk_seconds,
      "on_error": self.on_error,
      "shard": [s, self.shards],
      "items": self.rows(s),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def plan(
  builder: Builder,
  inputs,
  out: str | os.PathLike,
  *,
  episodes_per_shard: int = 64,
  num_shards: int = 0,
  on_error: str = "skip",
  chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
) -> Plan:
  """Lists the items of `inputs` and assigns each its shard. There are `num_shards` shards, or
  (when 0) enough for `episodes_per_shard` items each."""
  Policy(on_error)  # checks it
  if episodes_per_shard < 1 or num_shards < 0:
    raise ValueError(f"episodes_per_shard is {episodes_per_shard} and num_shards {num_shards}; want >= 1 and >= 0")
  items = builder.items(inputs)
  if not items:
    raise FileNotFoundError(f"no {builder.kind} inputs in {' '.join(map(os.fspath, inputs))}")
  shards = num_shards or max(1, math.ceil(len(items) / episodes_per_shard))
  groups: list[list[Item]] = [[] for _ in range(shards)]
  for item in items:
    groups[shard_of(item.id, shards)].append(item)
  sign = _signer(inputs)
  with concurrent.futures.ThreadPoolExecutor(16) as pool:  # a request per file not listed on object storage
    signatures = tuple(tuple(pool.map(lambda it: tuple(map(sign, it.versioned())), group)) for group in groups)
  return Plan(builder, paths.absolute(out), tuple(map(tuple, groups)), signatures, on_error, chunk_seconds)


def _signer(inputs) -> Callable[[str], str]:
  """`paths.signature` (a local transcript: the SHA-256 of its bytes), "" for a file that is not
  there, with the objects below each input prefix on object storage read from one listing of it
  rather than asked one by one."""
  listed: dict[str, str] = {}
  prefixes = []
  for x in map(os.fspath, inputs):
    if paths.is_remote(x) and not glob.has_magic(x) and paths.is_dir(x):
      listed.update(paths.signatures_under(x))
      prefixes.append(x.rstrip("/") + "/")

  @functools.cache  # a .jsonl file's lines are items of one file
  def sign(f: str) -> str:
    if not f:
      return ""
    if any(f.startswith(prefix) for prefix in prefixes):
      return listed.get(f, "")
    try:
      if not paths.is_remote(f) and f.endswith(transcripts.SUFFIXES):  # small: their bytes, not their time
        with open(f, "rb") as t:
          return "sha256:" + hashlib.sha256(t.read()).hexdigest()
      return paths.signature(f)
    except FileNotFoundError:
      return ""

  return sign


def _digests(path: str) -> tuple[str, str]:
  """(SHA-256 in hex, MD5 in base64 as object stores give it) of a file."""
  sha, md5 = hashlib.sha256(), hashlib.md5()
  with paths.open(path, "rb") as f:
    while block := f.read(1 << 20):
      sha.update(block)
      md5.update(block)
  return sha.hexdigest(), base64.b64encode(md5.digest()).decode()


def _write_json(path: str, value, *, unique: bool = False) -> None:
  """Writes JSON whole: one object on object storage; on a local disk, to a temporary name (one of
  its own with `unique`, for a file that two attempts at one shard may write at once) renamed."""
  text = json.dumps(value, indent=1) + "\n"
  if paths.is_remote(path):
    paths.write_text(path, text)
    return
  tmp = _temporary(path) if unique else path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _temporary(path: str) -> str:
  """A new file beside `path`, named after it and ending in ".tmp", that no one else writes."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  return tmp


def _items_file(p: Plan, s: int) -> str:
  return p.part(s).removesuffix(".json") + ".items"


def save_items(p: Plan, s: int) -> None:
  """Writes shard s's items and their versions beside its part, for a worker to `load_items`."""
  _write_json(_items_file(p, s), p.rows(s))


def load_items(p: Plan, s: int) -> Plan:
  """`p` (which may hold no items) with shard s's items as `save_items` wrote them."""
  rows = json.loads(paths.read_text(_items_file(p, s)))
  items, signatures = list(p.items), list(p.signatures)
  items[s] = tuple(Item(i, w, tuple(f), stem, tuple(part), error) for (i, w, f, stem, part, error), _ in rows)
  signatures[s] = tuple(tuple(sig) for _, sig in rows)
  return dataclasses.replace(p, items=tuple(items), signatures=tuple(signatures))


def read_part(p: Plan, s: int) -> dict | None:
  """Shard s's part, or None when there is none or it cannot be read."""
  try:
    part = json.loads(paths.read_text(p.part(s)))
  except (OSError, ValueError):
    return None
  return part if isinstance(part, dict) else None


def is_complete(p: Plan, s: int) -> bool:
  """Whether shard s is done: its part was written for this plan and its shard file still has the
  SHA-256 the part records (on object storage: the size and MD5 the store keeps for the object,
  when it keeps one, so that a resume does not download the dataset)."""
  part = read_part(p, s)
  if part is None or part.get("digest") != p.digest(s):
    return False
  if part.get("shard") is None:
    return True
  shard = paths.join(p.out, p.name(s))
  if not paths.is_file(shard):
    return False
  if paths.is_remote(shard):
    info = paths.info(shard)
    if info.get("md5Hash"):
      return info.get("size") == part.get("bytes") and info["md5Hash"] == part.get("md5")
  return _digests(shard)[0] == part.get("sha256")


def write_shard(p: Plan, s: int) -> dict:
  """Builds shard s's items one at a time into its ArrayRecord file, then writes its part; returns
  the part. A shard with no episode has a part and no file (`merge` removes an earlier build's).
  DataErrors are raised under `on_error="raise"`; a failed write raises OSError or RuntimeError
  (ArrayRecord's)."""
  name = p.name(s)
  target = paths.join(p.out, name)
  policy = Policy(p.on_error)
  entries: list[dict] = []
  totals: dict = {}
  remote = paths.is_remote(p.out)
  with tempfile.TemporaryDirectory(prefix="tmlx_shard_") if remote else contextlib.nullcontext() as tmp:
    local = os.path.join(tmp, name) if remote else _temporary(target)
    writer, index = None, 0
    try:
      for ep in p.builder.each(p.items[s], policy):
        if writer is None:
          writer = ArrayRecordWriter(local, WRITER_OPTIONS)
        records = episode_records(ep, p.chunk_seconds)
        for r in records:
          writer.write(r)
        info = EpisodeInfo(name, index, len(records), ep.id, ep.num_micro_turns, ep.has_audio, ep.has_video)
        entries.append(dataclasses.asdict(info))
        index += len(records)
        totals = stats.add(totals, stats.episode_stats(ep))
      if writer is not None:
        writer.close()
    except BaseException:  # a bad input under on_error="raise", a failed write: no half shard is left
      if writer is not None:
        with contextlib.suppress(Exception):
          writer.close()
      with contextlib.suppress(OSError):
        os.remove(local)
      raise
    digest = md5 = size = None
    if writer is not None:
      (digest, md5), size = _digests(local), os.path.getsize(local)
      if remote:
        paths.upload(local, target)
      else:
        os.replace(local, target)
  part = {
    "digest": p.digest(s),
    "shard": name if entries else None,
    "sha256": digest,
    "md5": md5,
    "bytes": size,
    "episodes": entries,
    "skipped": dict(sorted(policy.skips.items())),
    "warnings": dict(sorted(policy.warnings.items())),
    "stats": totals,
  }
  _write_json(p.part(s), part, unique=True)
  return part


def prepare(p: Plan) -> list[int]:
  """Gets `out` ready for a build of `p`: its parts directory made, the manifest of an earlier build
  removed when a shard is to be written; returns the shards to write (those not `is_complete`)."""
  paths.makedirs(p.out)
  paths.makedirs(paths.join(p.out, PARTS))
  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # reading shards back, or asking the store
    done = list(pool.map(lambda s: is_complete(p, s), range(p.shards)))
  todo = [s for s in range(p.shards) if not done[s]]
  manifest = paths.join(p.out, MANIFEST)
  if todo and paths.is_file(manifest):
    paths.remove(manifest)
  return todo


def merge(p: Plan) -> dict:
  """Joins the parts of every shard, in shard order, into `manifest.json` (not written when no
  shard holds an episode), and removes the shards, parts and temporary files of earlier builds that
  this one does not list; returns the manifest. Raises RuntimeError when a shard is not complete."""
  parts = []
  for s in range(p.shards):
    part = read_part(p, s)
    if part is None or part.get("digest") != p.digest(s):
      raise RuntimeError(f"{p.part(s)}: shard {s} of {p.shards} is not complete; run the build again to finish it")
    parts.append(part)
  skipped: collections.Counter = collections.Counter()
  warnings: collections.Counter = collections.Counter()
  totals: dict = {}
  for part in parts:
    skipped.update(part["skipped"])
    warnings.update(part["warnings"])
    totals = stats.add(totals, part["stats"])
  manifest = {
    "schema": SCHEMA_VERSION,
    "shards": [part["shard"] for part in parts if part["shard"]],
    "episodes": [e for part in parts for e in part["episodes"]],
    "skipped": dict(sorted(skipped.items())),
    "warnings": dict(sorted(warnings.items())),
    "stats": totals,
  }
  if manifest["episodes"]:  # else there is no dataset, and no manifest to say there is one
    _write_json(paths.join(p.out, MANIFEST), manifest)
  keep = set(manifest["shards"])
  for name in paths.listdir(p.out):
    stale = fnmatch.fnmatch(name, _SHARD_FILES) and name not in keep
    if stale or fnmatch.fnmatch(name, _TEMPORARY):
      paths.remove(paths.join(p.out, name))
  parts_keep = {p.part(s).rsplit("/", 1)[-1] for s in range(p.shards)}
  for name in paths.listdir(paths.join(p.out, PARTS)):
    if name not in parts_keep:
      paths.remove(paths.join(p.out, PARTS, name))
  return manifest


def describe(part: dict) -> str:
  """One line about a written shard's part."""
  skipped = sum(part["skipped"].values())
  return f"{part['shard'] or 'no shard'}: {len(part['episodes'])} episodes, {skipped} skipped"


def build_in_process(p: Plan, progress: Callable[[str], None] = log.info) -> tuple[dict, int, int]:
  """Writes every shard that is not complete, one after another (`progress` gets a line about
  each), then merges; returns (manifest, shards written, shards reused)."""
  todo = prepare(p)
  for k, s in enumerate(todo, 1):
    progress(f"shard {k}/{len(todo)} written, {describe(write_shard(p, s))}")
  return merge(p), len(todo), p.shards - len(todo)
