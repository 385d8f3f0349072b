"""One path layer for workdirs, checkpoints, metrics, configs, datasets and outputs: a local path or
an object-store URL (`gs://BUCKET/PATH`; also `s3://` and the other schemes of `etils.epath`).

Every module of tmlx and data_pipelines that touches files goes through these functions, so that
`--workdir=gs://B/run` writes to the bucket rather than to a local directory named `gs:`. Local
paths take the plain `os` and `pathlib` calls they always took (the same behaviour and the same
errors as before); URLs go through `etils.epath` and fsspec (`gcsfs` for gs://), imported only
when a URL is used. Where the emulator or the credentials are is the environment's business
(STORAGE_EMULATOR_HOST and friends, set by whoever starts the job): nothing here names a host.

What object stores do not have, and what these functions do instead:
  - directories: `makedirs` does nothing for a URL, a "directory" exists once an object is under it;
  - append: `open(url, "a")` would overwrite (fsspec's gcs backend warns and truncates), so
    `open` refuses it; writers that grow a file rewrite the whole object (`tmlx.metrics`);
  - rename: `move` copies every object under the prefix and then deletes the originals (not atomic:
    a reader may see both for a moment, never neither).
Checks (`exists`, `is_dir`, `is_file`, `listdir`) never create what they look at.
"""

from __future__ import annotations

import builtins
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import IO, Any


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (`scheme://...`) rather than a local path."""
  return "://" in os.fspath(path)


def path(p: str | os.PathLike) -> Any:
  """A pathlib-style object for `p`: `pathlib.Path` for a local path, `etils.epath.Path` for a URL
  (pathlib would fold `gs://b/x` into `gs:/b/x`, a local relative path)."""
  if is_remote(p):
    from etils import epath

    return epath.Path(os.fspath(p))
  return pathlib.Path(p)


def join(base: str | os.PathLike, *parts: str) -> str:
  """`base/part/...` with '/' for a URL (os.path.join on a local path)."""
  base = os.fspath(base)
  if is_remote(base):
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(base, *parts)


def absolute(p: str | os.PathLike) -> str:
  """An absolute local path, or the URL as it is (without a trailing '/')."""
  p = os.fspath(p)
  return p.rstrip("/") if is_remote(p) else os.path.abspath(p)


def _fs(url: str):
  """(fsspec filesystem, path in it) of a URL: the filesystem instance that epath (and so Orbax)
  uses, so that what these functions change drops out of the listings it has cached too."""
  from etils.epath import backend

  fs = backend.fsspec_backend.fs(url)
  return fs, fs._strip_protocol(url)


def _probe(p: str | os.PathLike, local: Callable[[str], bool], remote: str) -> bool:
  """`local(p)` on a local path; else the filesystem's method `remote`, asked afresh: another
  process (or tensorstore) may have written there since a cached listing."""
  if not is_remote(p):
    return local(p)
  fs, where = _fs(os.fspath(p))
  fs.invalidate_cache(where)
  return getattr(fs, remote)(where)


def exists(p: str | os.PathLike) -> bool:
  return _probe(p, os.path.exists, "exists")


def is_dir(p: str | os.PathLike) -> bool:
  """A local directory, or a URL prefix with at least one object under it."""
  return _probe(p, os.path.isdir, "isdir")


def is_file(p: str | os.PathLike) -> bool:
  return _probe(p, os.path.isfile, "isfile")


def makedirs(p: str | os.PathLike) -> None:
  """Creates a local directory and its parents (if missing); nothing for a URL (no directories)."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)


def open(p: str | os.PathLike, mode: str = "r") -> IO:  # noqa: A001 (the module's reader and writer)
  """The file at `p`, opened in `mode` ('r', 'w', 'rb', 'wb', or 'a' on a local path only).
  A URL written in 'w' becomes one object when the file is closed."""
  if not is_remote(p):
    return builtins.open(p, mode)
  if "a" in mode or "+" in mode:
    raise ValueError(f"{os.fspath(p)}: object storage cannot append or update in place (mode {mode!r})")
  return path(p).open(mode)


def read_text(p: str | os.PathLike) -> str:
  with open(p) as f:
    return f.read()


def read_bytes(p: str | os.PathLike) -> bytes:
  with open(p, "rb") as f:
    return f.read()


def write_text(p: str | os.PathLike, text: str) -> None:
  with open(p, "w") as f:
    f.write(text)


def listdir(p: str | os.PathLike) -> list[str]:
  """Names of the entries directly in directory `p` (sorted); [] when there is none."""
  if not is_remote(p):
    return sorted(os.listdir(p)) if os.path.isdir(p) else []
  fs, where = _fs(os.fspath(p))
  try:
    entries = fs.ls(where, detail=False, refresh=True)
  except FileNotFoundError:
    return []
  names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != where.rstrip("/")}
  return sorted(names)


def _in_path_order(names) -> list[str]:
  """Sorted by component, as pathlib sorts paths ("a/x" before "a-b/x"), for URLs too."""
  return sorted(names, key=lambda name: name.split("/"))


def files_under(p: str | os.PathLike) -> list[str]:
  """Every file below directory `p`, at any depth, as paths (or URLs) that start with `p`, in path order."""
  if not is_remote(p):
    return _in_path_order(str(f) for f in pathlib.Path(p).rglob("*") if f.is_file())
  return _in_path_order(signatures_under(p))


def signatures_under(url: str) -> dict[str, str]:
  """{URL: `signature`} of every object below the prefix `url`, from one listing."""
  fs, where = _fs(url)
  fs.invalidate_cache(where)
  base, root = url.rstrip("/"), where.rstrip("/")
  found = fs.find(where, detail=True)
  return {join(base, name[len(root) :].lstrip("/")): _object_signature(info) for name, info in found.items()}


def glob(pattern: str) -> list[str]:
  """The paths (or URLs, for a URL pattern) of the files matching a glob pattern (`**` spans
  directories), in path order."""
  if not is_remote(pattern):
    import glob as _glob

    return _in_path_order(p for p in _glob.glob(pattern, recursive=True) if os.path.isfile(p))
  fs, where = _fs(pattern)
  fs.invalidate_cache()
  scheme = pattern.split("://", 1)[0]
  found = fs.glob(where, detail=True)
  return _in_path_order(f"{scheme}://{name}" for name, info in found.items() if info.get("type") == "file")


_VERSION_FIELDS = ("generation", "VersionId", "md5Hash", "ETag", "crc32c", "mtime", "LastModified")


def _object_signature(info: dict) -> str:
  """An object's size and the first version field its store gives (GCS, S3 and fsspec's names)."""
  version = next((str(info[k]) for k in _VERSION_FIELDS if info.get(k)), None)
  if version is None:
    raise ValueError(f"{info.get('name')}: the store says nothing that tells versions of this object apart")
  return f"{info.get('size')}:{version}"


def info(url: str) -> dict:
  """What the object store keeps about an object (size, checksums, generation: fsspec's `info`)."""
  fs, where = _fs(url)
  fs.invalidate_cache(where)
  return fs.info(where)


def signature(p: str | os.PathLike) -> str:
  """What tells one version of a file from another without reading it: its size and modification
  time (an object's size and generation, or its checksum where the store keeps no generation).
  Raises FileNotFoundError when there is no such file."""
  if not is_remote(p):
    st = os.stat(p)
    return f"{st.st_size}:{st.st_mtime_ns}"
  return _object_signature(info(os.fspath(p)))


def download(src: str | os.PathLike, local: str | os.PathLike) -> None:
  """Copies the file (or object) `src` to the local path `local`."""
  if not is_remote(src):
    shutil.copyfile(src, local)
    return
  fs, where = _fs(os.fspath(src))
  fs.get_file(where, os.fspath(local))


def remove(p: str | os.PathLike) -> None:
  """Deletes one file (or object)."""
  if not is_remote(p):
    os.remove(p)
    return
  fs, where = _fs(os.fspath(p))
  fs.rm(where)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves a file or a directory tree from `src` to `dst` (which must not exist): a rename on a local
  disk; on object storage, a copy of every object under `src` followed by their deletion (gcsfs's
  own move tries an object-move API first, which emulators lack, and is no more atomic)."""
  src, dst = os.fspath(src), os.fspath(dst)
  if not is_remote(src) and not is_remote(dst):
    os.rename(src, dst)
    return
  if is_remote(src) != is_remote(dst):
    raise ValueError(f"cannot move {src} to {dst}: one is local, the other is not")
  fs, where = _fs(src)
  target = _fs(dst)[1]
  fs.invalidate_cache(where)
  if fs.exists(target):
    raise FileExistsError(f"{dst}: exists already; not moving {src} onto it")
  if fs.isdir(where):
    fs.copy(where.rstrip("/"), target.rstrip("/"), recursive=True)
    fs.rm(where, recursive=True)
  else:
    fs.copy(where, target)
    fs.rm(where)
  fs.invalidate_cache()


def upload(local: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Copies the local file `local` to `dst` (a URL or a local path), replacing what is there."""
  if not is_remote(dst):
    shutil.copyfile(local, dst)
    return
  fs, target = _fs(os.fspath(dst))
  fs.put_file(os.fspath(local), target)
