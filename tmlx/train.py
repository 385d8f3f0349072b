"""Training: the jitted train step and the `run(config, workdir)` driver.

`train_step` is a pure function of the state, the global batch and a static StepConfig. `run`
goes through the stages in the order they happen: mesh, abstract state and shardings, restore or
init (`tmlx.state.restore_or_init`), data, compile, loop. Periodic work (metrics, evaluation,
checkpoints) goes through `every`; what the loop does about faults is in `tmlx.faults`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import data_pipelines
from tmlx import checkpoint as checkpoint_lib
from tmlx import compile_cache, faults, flops, goodput, paths, profiling, sharding
from tmlx import config as config_lib
from tmlx import metrics as metrics_lib
from tmlx.checkpoint import Checkpointer
from tmlx.losses import LossConfig, loss_config, loss_sums, target_counts
from tmlx.metrics import MetricWriter, Progress
from tmlx.nn.model import ModelConfig, count_parameters
from tmlx.nn.moe import balance_bias_update
from tmlx.optim import clip_by_global_norm
from tmlx.state import StateSpec, TrainState, restore_or_init, state_spec
from tmlx.workdir_lock import WorkdirLock, lock_for_job


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything static that `train_step` needs besides the state and the batch."""

  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  loss: LossConfig
  grad_accum_steps: int
  clip_norm: float
  bias_update_rate: float
  seed: int
  mesh: Any
  rules: Any
  nan_steps: tuple[int, ...] = ()  # fault drill: steps (1-based, as logged) whose loss is NaN


def _micro_batches(batch: dict, n: int) -> dict:
  """[B, ...] → [n, B/n, ...], micro-batch i = rows i, i+n, ... (each spans all data shards)."""

  def split(x):
    y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(y, (None, "batch") + (None,) * (x.ndim - 1))

  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict, sc: StepConfig) -> tuple[TrainState, dict]:
  """One optimizer step over the global batch (with `grad_accum_steps` micro-batches)."""
  with sharding.use_mesh_rules(sc.mesh, sc.rules):
    key = jax.random.fold_in(jax.random.key(sc.seed), state.step)
    text_norm, audio_norm = target_counts(batch, sc.loss)
    text_norm, audio_norm = jnp.maximum(text_norm, 1.0), jnp.maximum(audio_norm, 1.0)
    n = sc.grad_accum_steps
    lc = sc.loss

    def loss_fn(params, micro, k):
      model = nnx.merge(sc.graphdef, params, state.model_state)
      out = model(micro)
      sums = loss_sums(model, out, micro, k, lc)
      text = sums.text_sum / text_norm
      flow = sums.flow_sum / audio_norm
      lb, z = jnp.mean(out.moe.load_balance_loss), jnp.mean(out.moe.z_loss)
      loss = lc.text_weight * text + lc.flow_weight * flow + (lc.load_balance_weight * lb + lc.z_loss_weight * z) / n
      if sc.nan_steps:  # a multiplied NaN also makes every gradient NaN, like a real blow-up
        drill = jnp.isin(state.step + 1, jnp.asarray(sc.nan_steps, jnp.int32))
        loss = loss * jnp.where(drill, jnp.nan, 1.0).astype(loss.dtype)
      return loss, (sums, out.moe)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, xs):
      micro, i = xs
      (loss, aux), grads = grad_fn(state.params, micro, jax.random.fold_in(key, i))
      carry = jax.tree.map(jnp.add, carry, (loss, grads, aux))
      return carry, None

    if n == 1:  # no accumulation buffers: they cost a pass over all gradients
      (loss, (sums, moe)), grads = grad_fn(state.params, batch, jax.random.fold_in(key, 0))
    else:
      micro = _micro_batches(batch, n)
      first = jax.tree.map(lambda x: x[0], micro)
      zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, first, key))
      zero = (zero[0][0], zero[1], zero[0][1])
      (loss, grads, (sums, moe)), _ = jax.lax.scan(accumulate, zero, (micro, jnp.arange(n)))

    grad_norm = optax.tree.norm(grads)
    grads = clip_by_global_norm(grads, grad_norm, sc.clip_norm)
    updates, opt_state = sc.tx.update(grads, state.opt_state, state.params)
    update_norm = optax.tree.norm(updates)
    params = optax.apply_updates(state.params, updates)
    model_state = _update_router_biases(state.model_state, moe.expert_load / n, sc.bias_update_rate)
    # A non-finite loss, gradient or update (a NaN learning rate, an optimizer moment that
    # overflowed) skips the update: the step advances, nothing else changes, so a non-finite
    # state is never trained on or saved.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = TrainState(
      step=state.step + 1,
      params=keep(params, state.params),
      model_state=keep(model_state, state.model_state),
      opt_state=keep(opt_state, state.opt_state),
    )

    assignments = jnp.maximum(moe.assignments, 1.0)  # [L], summed over micro-batches
    metrics = {
      "loss": loss,
      "text_loss": sums.text_sum / text_norm,
      "flow_loss": sums.flow_sum / audio_norm,
      "load_balance_loss": jnp.mean(moe.load_balance_loss) / n,
      "router_z_loss": jnp.mean(moe.z_loss) / n,
      "router_entropy": jnp.mean(moe.router_entropy) / n,
      "moe_dropped_fraction": jnp.sum(moe.dropped) / jnp.sum(assignments),
      # Per layer ([L] or [L, E]); the host splits them into one scalar per layer.
      "moe/expert_load": moe.expert_load / n,
      "moe/dropped_fraction": moe.dropped / assignments,
      "moe/router_entropy": moe.router_entropy / n,
      "moe/load_balance_loss": moe.load_balance_loss / n,
      "moe/router_z_loss": moe.z_loss / n,
      "grad_norm": grad_norm,
      "update_norm": update_norm,
      "bad_step": 1.0 - ok.astype(jnp.float32),
      "learning_rate": sc.schedule(state.step),
      "text_targets": text_norm,
      "audio_targets": audio_norm,
      "text_targets_overflow": sums.text_overflow.astype(jnp.float32),
      "audio_targets_overflow": sums.audio_overflow.astype(jnp.float32),
      "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
      "positions": jnp.asarray(batch["segment_ids"].size, jnp.float32),
    }
    return new_state, metrics


def step_config(config: ml_collections.ConfigDict, spec: StateSpec, mesh, rules) -> StepConfig:
  return StepConfig(
    graphdef=spec.graphdef,
    tx=spec.tx,
    schedule=spec.schedule,
    loss=loss_config(config),
    grad_accum_steps=config.optimizer.grad_accum_steps,
    clip_norm=config.optimizer.clip_norm,
    bias_update_rate=config.model.moe.bias_update_rate,
    seed=config.seed,
    mesh=mesh,
    rules=rules,
    nan_steps=faults.TrainConfig.from_config(config.train).nan_steps,
  )


def jit_train_step(config: ml_collections.ConfigDict, spec: StateSpec, mesh, rules):
  """(jitted step, batch shardings, abstract global batch): what `run` compiles, and what
  `tmlx.plan --compile` compiles for a target it does not have (`step_fn.lower(spec.abstract,
  abstract_batch).compile()`)."""
  row = data_pipelines.row_spec(config)
  batch_sh = {k: sharding.batch_sharding(mesh, rules, len(shape) + 1) for k, (shape, _) in row.fields().items()}
  step_fn = jax.jit(
    functools.partial(train_step, sc=step_config(config, spec, mesh, rules)),
    in_shardings=(spec.shardings, batch_sh),
    out_shardings=(spec.shardings, NamedSharding(mesh, PartitionSpec())),
    donate_argnums=(0,),
  )
  abstract_batch = {
    k: jax.ShapeDtypeStruct((config.data.global_batch_size, *shape), dtype, sharding=batch_sh[k])
    for k, (shape, dtype) in row.fields().items()
  }
  return step_fn, batch_sh, abstract_batch


def _update_router_biases(model_state: dict, expert_load: jax.Array, rate: float) -> dict:
  """Aux-loss-free balancing of every MoE layer from this step's load [L, E]."""
  if rate == 0:
    return model_state

  def update(path, leaf):
    if str(getattr(path[-1], "key", "")) == "router_bias":
      return balance_bias_update(leaf, expert_load, rate)
    return leaf

  return jax.tree.map_with_path(update, model_state)


def every(step: int, n: int, last: int | None = None) -> bool:
  """True on every n-th step (and on `last`); n ≤ 0 means never."""
  return (n > 0 and step % n == 0) or step == last


def _global_batch(local: dict, shardings: dict) -> dict:
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


def run(config: ml_collections.ConfigDict, workdir: str, recorder: goodput.Recorder | None = None) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns final metrics.

  The job holds the workdir's lock (`tmlx.workdir_lock`) from before it writes anything there
  until it ends: a second trainer on the same workdir refuses to start. `recorder` is the goodput
  clock of this process (tmlx.main starts it at process start and writes it last at exit); without
  one, the run keeps its own from this call on and writes it when it returns."""
  config_lib.validate(config, jax.device_count())
  paths.makedirs(workdir)
  lock = lock_for_job(workdir)
  recorder = goodput.Recorder() if recorder is None else recorder
  restore_cache_setting = None
  try:
    recorder.attach(workdir, write=jax.process_index() == 0)
    # After the lock: a refused trainer writes nothing here. Before the first compile of the run.
    cache_dir = compile_cache.directory(config.runtime, workdir)
    restore_cache_setting = compile_cache.enable(cache_dir)
    recorder.compile_cache(dir=cache_dir)
    logging.info("persistent compilation cache: %s", cache_dir or "off (config.runtime.compile_cache=False)")
    return _run(config, workdir, lock, recorder)
  except BaseException as e:
    recorder.ended_by(f"stopped: {type(e).__name__}")
    raise
  finally:
    recorder.enter("shutdown")
    if restore_cache_setting is not None:
      restore_cache_setting()
    if lock is not None:
      lock.release()
    recorder.finish()  # ended; tmlx.main's exit hook rewrites it on a local workdir, shutdown counted


def _run(
  config: ml_collections.ConfigDict, workdir: str, lock: WorkdirLock | None, recorder: goodput.Recorder
) -> dict[str, float]:
  # Mesh.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_table(config.mesh.rules)
  logging.info("mesh %s on %d processes", dict(mesh.shape), jax.process_count())
  resolved = config.to_dict()

  # Abstract state and shardings.
  num_steps = config.train.num_steps
  spec = state_spec(config, mesh, rules)
  total, active = count_parameters(spec.abstract.params, ModelConfig.from_config(config.model))
  logging.info("model: %.3fM parameters, %.3fM active per token", total / 1e6, active / 1e6)
  logging.info("parameter shardings:\n%s", sharding.describe(spec.shardings.params, spec.abstract.params))

  # Restore or initialize, sharded (the order of precedence is written above tmlx.state.restore_or_init).
  ckpt = Checkpointer(
    paths.join(workdir, "checkpoints"),
    keep=config.checkpoint.keep,
    keep_every=config.checkpoint.keep_every,
    async_save=config.checkpoint.async_save,
  )
  aside = checkpoint_lib.quarantined(ckpt.directory)
  if aside:
    logging.warning(
      "%s holds %d checkpoint step(s) an earlier run found unusable and moved aside: %s; inspect them with "
      "python -m tmlx.checkpoint inspect, and delete them when done",
      ckpt.directory,
      len(aside),
      ", ".join(aside),
    )
  data_spec = data_pipelines.data_spec_hash(config)
  recorder.enter("restore")
  try:
    state, latest = restore_or_init(config, spec, ckpt)
  except BaseException:
    ckpt.close()
    raise
  recorder.enter("startup")
  if latest is not None:
    saved_spec = ckpt.restore_meta(latest).get("data", {}).get("spec_hash")
    if saved_spec != data_spec:
      logging.warning(
        "the data spec changed since checkpoint step %d (hash %s, now %s): rows from here on differ from "
        "those the original run would have read",
        latest,
        saved_spec,
        data_spec,
      )
  # Only now: a config that a checkpoint here refused does not replace the one that wrote it.
  if jax.process_index() == 0:
    with paths.open(paths.join(workdir, "config.json"), "w") as f:
      json.dump({"hash": config_lib.config_hash(config), "config": resolved}, f, indent=1)

  def save(step: int, state: TrainState) -> None:
    data = {"step": step, "seed": config.seed, "spec_hash": data_spec}
    with recorder.span("checkpoint"):
      writer.flush()  # the metrics rows up to `step` are stored before a checkpoint of it can exist
      ckpt.save(step, state, resolved, mesh_shape=dict(mesh.shape), data=data)
    recorder.saved(step)

  start = int(state.step)
  lost_steps, lost_s = recorder.restored(start)
  if lost_steps:
    logging.warning(
      "goodput: %d step(s) (%.1f s of step time) that earlier runs in this workdir trained after step %d are "
      "lost (not in the checkpoint resumed from) and run again",
      lost_steps,
      lost_s,
      start,
    )

  # Data: this process's rows of each global batch, from the restored step on.
  row = data_pipelines.row_spec(config)
  data = iter(
    data_pipelines.make_dataset(
      config,
      start_step=start,
      num_steps=num_steps,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  )
  step_fn, batch_sh, abstract_batch = jit_train_step(config, spec, mesh, rules)
  local_rows = config.data.global_batch_size // jax.process_count()
  logging.info(
    "data: process %d reads rows %d..%d of each global batch of %d",
    jax.process_index(),
    jax.process_index() * local_rows,
    (jax.process_index() + 1) * local_rows - 1,
    config.data.global_batch_size,
  )

  # Duplex evaluation on held-out conversations (config.eval): one session, compiled at its first use.
  probe = None
  if config.eval.every > 0:
    from tmlx.eval.duplex import TrainingProbe

    probe = TrainingProbe(config, spec.graphdef)
    logging.info(
      "duplex evaluation every %d steps on %d conversations of %s",
      config.eval.every,
      len(probe.conversations),
      ",".join(probe.dirs),
    )

  # Compile once.
  recorder.enter("compile")
  t0 = time.perf_counter()
  hits_before = compile_cache.hits()
  compiled = step_fn.lower(state, abstract_batch).compile()
  requests, hits = (a - b for a, b in zip(compile_cache.hits(), hits_before))
  recorder.compile_cache(train_step_hit=bool(hits) if requests else None)
  logging.info(
    "compiled train_step in %.1fs%s",
    time.perf_counter() - t0,
    " (persistent compilation cache hit)" if hits else "",
  )
  recorder.enter("startup")

  # Throughput accounting: model FLOPs per position and the peak of one device.
  flops_per_pos = flops.flops_per_token(config)
  peak, peak_source = flops.peak_flops_per_device(jax.devices()[0], config.model.compute_dtype)
  logging.info(
    "%.4g model FLOPs per position (train step); peak %s FLOP/s per device (%s)",
    flops_per_pos,
    "unknown" if peak is None else f"{peak:.4g}",
    peak_source,
  )

  # Loop. On any exit, in-flight checkpoint writes finish before the process goes.
  writer = MetricWriter(workdir, tensorboard=config.logging.tensorboard, start_step=start)
  progress = Progress(start, num_steps)
  data_stats = faults.DataStats(config.data.max_skip_ratio)
  bad_steps = faults.BadSteps(config.train.max_consecutive_bad_steps, on_bad=recorder.bad_step)
  last_metrics: dict[str, float] = {}
  t_log, step_log = time.perf_counter(), start
  preemption = faults.Preemption()
  watchdog = faults.Watchdog(config.train.step_timeout_s)
  profiler = profiling.Profiler(profiling.ProfileConfig.from_config(config.profile), workdir, jax.process_index())
  recorder.steps_begin()
  try:
    for step in range(start + 1, num_steps + 1):
      watchdog.beat(step)
      with recorder.span("profile"):
        profiler.step(step, state)
      with recorder.span("data_wait"):
        local, stats = next(data)
      data_stats.add(stats)
      # A background save that failed, or a lock another job took over, stops every process now
      # (not at the next save), in the same all-gather as the preemption flag.
      trouble = faults.trouble(lock, ckpt)
      preempted, troubled = preemption.agreed(trouble is not None)
      if troubled:
        raise trouble or checkpoint_lib.CheckpointError("another process of this job stopped here: see its log")
      if preempted:  # a SIGTERM in any process: every process stops here, after step - 1
        done = step - 1
        if config.checkpoint.every > 0 and done > start and not every(done, config.checkpoint.every):
          save(done, state)
        with recorder.span("checkpoint"):
          ckpt.wait()
        recorder.ended_by(f"preempted at step {done}")
        if done in ckpt.all_steps():
          logging.warning("preempted at step %d: saved (checkpoint complete); rerun to resume", done)
        else:
          logging.warning("preempted at step %d: no checkpoint of it (checkpoint.every=0 or no step taken)", done)
        break
      if config.train.check_batches:
        data_pipelines.check_batch(local, row, config.model.vocab_size, where=f"data batch of step {step}")
      batch = _global_batch(local, batch_sh)
      if config.logging.row_digests:
        logging.info("row digests of step %d: %s", step, metrics_lib.row_digests(batch))
      state, metrics = compiled(state, batch)
      # The previous step's flag: reading it does not wait for the step just dispatched.
      try:
        bad_steps.observe()
      except faults.BadStepsError:
        save(step, state)
        raise
      bad_steps.pending = (step, metrics["bad_step"])
      evaluate = probe is not None and every(step, config.eval.every, last=num_steps)
      # One metrics row per logged step; a step with a duplex evaluation is always logged, its
      # figures in the same row as the losses.
      if evaluate or every(step, config.logging.every, last=num_steps):
        m, arrays = metrics_lib.host_metrics(jax.device_get(metrics))
        now = time.perf_counter()
        m["step_time_s"] = (now - t_log) / (step - step_log)
        m["tokens_per_s"] = m["tokens"] / m["step_time_s"]
        m.update(metrics_lib.throughput(m["positions"] / m["step_time_s"], flops_per_pos, peak))
        m.update(data_stats.metrics())
        m["bad_steps"] = float(bad_steps.total)
        progress.log(step, m)
        if evaluate:
          with recorder.span("eval"):
            m.update(_duplex_eval(probe, step, state, report=config.eval.report and step == num_steps))
        t_log, step_log = time.perf_counter(), step  # the evaluation's time is not a training step's
        writer.write(step, m, arrays)
        metrics_lib.warn_about(step, m, config)
        last_metrics = m
      recorder.step_done(step)
      if every(step, config.checkpoint.every, last=num_steps if config.checkpoint.every > 0 else None):
        save(step, state)
    bad_steps.observe()
    recorder.ended_by("completed")
  finally:
    profiler.close()
    recorder.enter("checkpoint")  # the last saves finish
    try:
      ckpt.close()
    finally:
      try:
        writer.close()
      finally:
        preemption.close()  # only now: a SIGTERM while the last save finishes does not cut it short
        watchdog.close()
  return last_metrics


def _duplex_eval(probe, step: int, state: TrainState, *, report: bool) -> dict[str, float]:
  """Scores the current parameters on the probe's held-out conversations: their duplex/* figures."""
  from tmlx.eval import duplex

  t0 = time.perf_counter()
  result = probe(state.params, state.model_state)
  # A figure with nothing to measure (no barge-in in these conversations) is left out, not NaN.
  scalars = {
    f"duplex/{k}": float(v) for k, v in result.summary.items() if isinstance(v, (int, float)) and math.isfinite(v)
  }
  if jax.process_index() == 0:
    s = result.summary
    logging.info(
      "step %d duplex (%d conversations, %.0f s): takeover %.2f, latency p50 %.2f s, word accuracy %.2f, "
      "background calls %.2f, false takeovers %.2f/turn, barge-in yield p50 %.2f s, voiced agreement %.2f, "
      "mel error vs mean %.2f",
      step,
      s["conversations"],
      time.perf_counter() - t0,
      s["takeover_rate"],
      s["response_latency_s_p50"],
      s["answer_word_accuracy"],
      s["bg_call_rate"],
      s["false_takeover_rate"],
      s["barge_in_yield_s_p50"],
      s["voiced_agreement"],
      s["mel_error_vs_mean"],
    )
    if report:
      logging.info("duplex report at step %d (held-out conversations):\n%s", step, duplex.report(result))
  return scalars
