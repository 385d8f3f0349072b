"""Does a dataset build scale: memory flat in the corpus, time shared by its workers?

Run:  python benchmarks/build.py              (about 3 minutes on 2 shared cores, 1.3 GB of temporary files)

It generates two-channel FLAC recordings at 48 kHz with JSON transcripts
(`data_pipelines.sample_corpus.recordings`, 20 s each by default: a baseline corpus of --recordings
and a corpus 4x larger that contains it), then measures, each build a fresh
`python -m data_pipelines.build audio` process into an empty directory:
  (1) the peak RSS (of the process and the workers it waited for) of the in-process build of the
      4x corpus ÷ that of the baseline corpus: the builders stream one episode at a time, so
      memory should not follow the corpus;
  (2) the wall time of the 4x corpus built on Apache Beam's DirectRunner in multi-processing mode
      with 1 worker ÷ with 2 workers (alternating, --repeats each, medians): the throughput with 2
      workers ÷ with 1 on this machine's cores (start-up included; shards are ~8 recordings, so
      the work divides);
  (3) hours of audio built per core-hour: the in-process build, and the 2-worker Beam build (2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_pipelines.sample_corpus.recordings import write_recordings  # noqa: E402

RSS_TARGET = 1.3
SPEEDUP_TARGET = 1.6


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--recordings", type=int, default=120, help="recordings of the baseline corpus (default: %(default)s)")
  p.add_argument("--seconds", type=float, default=20.0, help="length of each recording (default: %(default)s)")
  p.add_argument("--repeats", type=int, default=2, help="Beam builds per worker count (default: %(default)s)")
  return p.parse_args(argv)


def timed_build(inputs: list[str], out: str, *extra: str) -> tuple[float, float]:
  """(wall seconds, peak RSS in MiB) of one build into a fresh `out`."""
  shutil.rmtree(out, ignore_errors=True)
  args = [sys.executable, "-m", "data_pipelines.build", "audio", *inputs, f"--out={out}", "--episodes_per_shard=8"]
  start = time.perf_counter()
  proc = subprocess.Popen([*args, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  stdout = proc.stdout.read()  # to its end first: a build that fills the pipe would wait on it
  proc.stdout.close()
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0 or "skipped: 0" not in stdout:
    raise SystemExit(f"the build of {inputs} failed ({proc.returncode}):\n{stdout}")
  return wall, usage.ru_maxrss / 1024


def main(argv=None) -> None:
  args = parse_args(argv)
  n = args.recordings
  with tempfile.TemporaryDirectory(prefix="tmlx_build_bench_") as tmp:
    base, more = os.path.join(tmp, "base"), os.path.join(tmp, "more")
    t = time.perf_counter()
    write_recordings(base, n, seconds=args.seconds, rates=(48000,), suffix=".flac")
    write_recordings(more, 3 * n, seconds=args.seconds, rates=(48000,), suffix=".flac", first=n)
    hours = {"base": n * args.seconds / 3600, "4x": 4 * n * args.seconds / 3600}
    print(f"corpus: {n} + {3 * n} recordings of {args.seconds:g} s generated in {time.perf_counter() - t:.0f} s")
    out = os.path.join(tmp, "out")

    base_wall, base_rss = timed_build([base], out)
    big_wall, big_rss = timed_build([base, more], out)
    print(f"in process, baseline ({hours['base']:.2f} h): {base_wall:.1f} s, peak RSS {base_rss:.0f} MiB")
    print(f"in process, 4x ({hours['4x']:.2f} h): {big_wall:.1f} s, peak RSS {big_rss:.0f} MiB")

    walls: dict[int, list[float]] = {1: [], 2: []}
    rss: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
      for workers in (1, 2):
        beam = [
          "--runner=DirectRunner",
          "--",
          f"--direct_num_workers={workers}",
          "--direct_running_mode=multi_processing",
        ]
        wall, peak = timed_build([base, more], out, *beam)
        walls[workers].append(wall)
        rss[workers].append(peak)
        print(f"Beam DirectRunner, {workers} worker(s), 4x: {wall:.1f} s, peak RSS {peak:.0f} MiB")
    one, two = statistics.median(walls[1]), statistics.median(walls[2])

  per_core_in_process = hours["4x"] / (big_wall / 3600)
  per_core_beam = hours["4x"] / (two / 3600) / 2
  print(
    f"hours of audio built per core-hour: {per_core_in_process:.0f} in process, {per_core_beam:.0f} on Beam (2 workers)"
  )
  results = {
    "build_peak_rss_4x_vs_base": (big_rss / base_rss, f"target<={RSS_TARGET:g}"),
    "build_throughput_2_vs_1_workers": (one / two, f"target>={SPEEDUP_TARGET:g}"),
  }
  for name, (value, target) in results.items():
    print(f"{name} {value:.3g} {target}")


if __name__ == "__main__":
  main()
