"""Every config field of tmlx, defined and documented once.

Presets (`experiments/*.py`) start from `get_config()` here and only override values; adding a
key in a preset is an error (a test checks it), and so is overriding an unknown key from the
command line (the config is locked). Model sizes are one table (SIZES, applied by `apply_size`);
each preset reads its argument with `parse_arg` ("tiny": its variant for tests, "size=NAME").
"""

import os

import ml_collections as mlc

# Logical axis → mesh axes. Parameters and activations carry the logical names; this table is
# the only place that maps them onto the mesh (`tmlx.sharding`). A mesh axis appears at most once
# per array; if two dimensions of one array claim the same mesh axis, the later one is replicated.
DEFAULT_RULES = (
  # activations
  ("batch", ("data", "fsdp", "expert")),
  ("act_seq", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_expert", "expert"),
  # parameters
  ("layers", None),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("expert", "expert"),
  ("stem", None),
)


def get_config(arg=None):
  del arg  # base has no variants
  c = mlc.ConfigDict()
  # Seed of parameter initialization, data order and every loss-side random draw.
  c.seed = 0

  c.model = m = mlc.ConfigDict()
  # Vocabulary size; ids ≥ this are rejected by the data contract check.
  m.vocab_size = 320
  # Width of the residual stream (D).
  m.d_model = 128
  # Number of decoder blocks (scanned: compile time is independent of it).
  m.num_layers = 4
  # Query heads (N) and key/value heads (K); N must be a multiple of K (GQA).
  m.num_heads = 4
  m.num_kv_heads = 2
  # Size of each attention head (H).
  m.head_dim = 32
  # RoPE base frequency, applied over `positions` (the position within the segment).
  m.rope_theta = 10_000.0
  # Sliding-window attention: each position attends to this many latest positions of its segment
  # (itself included); 0 attends to the whole segment (causal). A streaming session attends as the
  # model was trained to: with a window W its KV cache is a ring of W positions (stream.window must
  # be W), so a session of any length costs the same per micro-turn. Train with rows longer than W
  # (data.seq_len), so that most positions, like every live one after the first W, see only the
  # last W: a model trained only on rows that start in its view leans on that start (an "attention
  # sink") and breaks when a ring evicts it.
  m.attention_window = 0
  # How attention is computed; every choice has the same mask (causal, within the segment, the
  # window above). 'dense' materializes the fp32 logits [B, K, G, S, S]; 'blockwise' (pure JAX,
  # any backend) computes them a block at a time, memory linear in S, skipping the blocks the
  # causal mask and the window rule out; 'splash' is the TPU Pallas kernel, 'pallas_gpu' the GPU
  # one (no window), 'cudnn' cuDNN through jax.nn.dot_product_attention (GPU; packed rows' segments
  # reach it as a [B, 1, S, S] mask). 'auto': splash on TPU; pallas_gpu on GPU, blockwise there
  # with a window; on CPU dense below 1024 positions, blockwise from there (tmlx.nn.attention).
  m.attention_impl = "auto"
  # Positions per block of 'blockwise' and 'splash' (query and key blocks alike; 'pallas_gpu' caps
  # it at 128); a row that is not a multiple of it is padded.
  m.attention_block = 512
  # RMSNorm on queries and keys before RoPE.
  m.qk_norm = True
  # Epsilon of every RMSNorm / LayerNorm.
  m.norm_eps = 1e-6
  # dMel frames per audio position (F): 4 frames of 12.5 ms = 50 ms, 4 positions per micro-turn.
  m.frames_per_position = 4
  # Width of the hMLP stem's first two stages (c); 0 means min(d_model // 4, 1024).
  m.stem_width = 0
  # Size of the learned row / column embeddings of the patch grid (frames up to this many patches).
  m.max_grid_rows = 8
  m.max_grid_cols = 8
  # Untied text unembedding (a separate [D, V] matrix) when false: the embedding is reused.
  m.tie_embeddings = False
  # Parameter dtype (optimizer state follows it) and the dtype of matmuls and activations.
  m.param_dtype = "float32"
  m.compute_dtype = "bfloat16"
  # Rematerialization of each scanned block: 'none', 'full' or 'dots' (save matmul outputs).
  m.remat = "none"
  # Decoder blocks per iteration of the layer scan: 1 keeps compile time independent of depth;
  # num_layers unrolls fully (XLA:CPU then avoids copying each layer's weights in and out).
  m.scan_unroll = 1

  m.moe = mlc.ConfigDict()
  # Routed experts (E); must be divisible by the mesh's expert axis.
  m.moe.num_experts = 8
  # Experts each token is routed to (top-k).
  m.moe.num_experts_per_tok = 2
  # Always-on shared experts (each of size d_ff), added to the routed output.
  m.moe.num_shared_experts = 1
  # Hidden size of one SwiGLU expert (F).
  m.moe.d_ff = 128
  # Expert capacity per batch row = capacity_factor · S · k / E; ≤ 0 means dropless.
  m.moe.capacity_factor = 2.0
  # Renormalize the top-k router weights to sum to 1.
  m.moe.renormalize = True
  # Router scores: 'softmax' over experts or independent 'sigmoid' per expert.
  m.moe.router_score = "softmax"
  # Aux-loss-free balancing: per-step change of the routing bias (0 keeps the bias at zero).
  m.moe.bias_update_rate = 0.0
  # How tokens reach their experts: 'local' (GSPMD), 'all_to_all' (shard_map over the expert
  # axis; runs on CPU), 'ragged' (grouped matmul for GPU/TPU), 'dropless' (exactly the routed
  # tokens over the expert axis with ragged_all_to_all, emulated on CPU; needs capacity_factor ≤ 0).
  m.moe.transport = "local"
  # Weights of the load-balancing loss and of the router z-loss.
  m.moe.load_balance_weight = 0.01
  m.moe.z_loss_weight = 0.001
  # Fraction of dropped routed assignments above which the train loop logs a warning.
  m.moe.drop_warn_fraction = 0.05

  m.flow = mlc.ConfigDict()
  # Width (w) and residual depth of the flow-matching head.
  m.flow.width = 128
  m.flow.depth = 2
  # Draws of (t, x0) per AUDIO_OUT target.
  m.flow.num_draws = 4
  # Distribution of the flow time t: 'logit_normal' or 'uniform'.
  m.flow.t_sampling = "logit_normal"
  # σ_min of the optimal-transport path.
  m.flow.sigma_min = 1e-4

  c.loss = mlc.ConfigDict()
  # Weights of the text cross-entropy and of the flow-matching loss in the total loss.
  c.loss.text_weight = 1.0
  c.loss.flow_weight = 1.0
  # Weight of an `<eot>` target in a micro-turn where the model says nothing.
  c.loss.silent_eot_weight = 1.0
  # The first this many micro-turns of a training window cut from the middle of a conversation are
  # context only, with no text or audio loss: what the model was saying before the window is not in
  # it, so it cannot know what to say there (windows from a conversation's start are trained on
  # from their first micro-turn). 0 trains on every micro-turn.
  c.loss.burn_in_micro_turns = 0
  # Static bounds on targets per row, as fractions of seq_len (logits are computed only there).
  # Targets past the bound are counted in the `*_targets_overflow` metrics and warned about.
  c.loss.max_text_target_fraction = 0.5
  c.loss.max_audio_target_fraction = 0.5

  c.mesh = mlc.ConfigDict()
  # Mesh axis sizes within one ICI domain (a TPU slice; a GPU or CPU host when mesh.dcn is used,
  # else all devices); their product must equal its device count; one may be -1 (fills the rest).
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.expert = 1
  c.mesh.tensor = 1
  # Axis sizes across ICI domains (over the data-center network: TPU slices, or hosts, one process
  # each). All 1: one ICI domain. Each mesh axis is dcn x ici devices long (a hybrid mesh).
  c.mesh.dcn = mlc.ConfigDict()
  c.mesh.dcn.data = 1
  c.mesh.dcn.fsdp = 1
  c.mesh.dcn.expert = 1
  c.mesh.dcn.tensor = 1
  # Logical-axis rules (see DEFAULT_RULES).
  c.mesh.rules = DEFAULT_RULES

  # Per-accelerator settings, chosen at start-up (`tmlx.runtime.accelerators`): name -> row with
  #   match      case-insensitive substrings of the accelerator's name ("h100", "tpu v5p", "cpu"),
  #              comma separated; rows are tried in the order of their names (a ConfigDict sorts
  #              its keys) and the first with a matching substring wins;
  #   mesh       ICI axis sizes, e.g. {"fsdp": 8, "expert": 8}; dcn  DCN axis sizes, e.g. {"data": 4};
  #   xla_flags  appended to XLA_FLAGS (LIBTPU_INIT_ARGS on TPU) before JAX starts;
  #   remat      model.remat for this accelerator ("" keeps the preset's);
  #   grad_accum_steps  optimizer.grad_accum_steps (micro-batches per step) for it (0 keeps);
  #   moe_transport, moe_capacity_factor  model.moe.transport and .capacity_factor for it.
  # Fields a row leaves out keep the preset's values. No row matches: the preset is used as is.
  c.mesh_rules = mlc.ConfigDict()

  c.data = mlc.ConfigDict()
  # Row source: 'episodes' (episode datasets built by `python -m data_pipelines.build`) or
  # 'synthetic' (learnable synthetic conversations, no files needed).
  c.data.source = "synthetic"
  # For 'episodes': the datasets and their weights, "DIR:WEIGHT,DIR:WEIGHT,..." (each row is drawn
  # from one dataset by weight). A relative DIR is looked up in the working directory, then in the
  # project root (where the sample corpus lives, under data/sample/). Weights that change over
  # training are stages after ";", each from its step on: "a:0.7,b:0.3;5000=a:0.2,b:0.8" (a
  # dataset a stage leaves out has weight 0 there).
  c.data.mixture = ""
  # Text tokenizer: 'byte', or 'sentencepiece:PATH' for a model trained with
  # `python -m data_pipelines.tokenizer train`. Its ids must be < model.vocab_size.
  c.data.tokenizer = "byte"
  # dMel framing: causal (each frame reads only past samples, as the streaming session does) or
  # the centered reference framing.
  c.data.audio_causal = True
  # Micro-turns per window cropped from an episode; 0: as many as fit the row.
  c.data.max_window = 0
  # Bad episodes: 'raise' stops at the first, naming file, record and field; 'skip' draws another
  # and counts the bad one per reason (logged as data/skipped_*).
  c.data.on_error = "skip"
  # With 'skip': training stops when the skipped fraction of episode draws passes this (checked
  # once 100 draws have been made).
  c.data.max_skip_ratio = 0.01
  # Episode headers (text, events, alignment; no media) cached per process (or worker).
  c.data.episode_cache = 64
  # Positions per row (S) and rows per global batch (B).
  c.data.seq_len = 256
  c.data.global_batch_size = 8
  # Video patches a row can hold (P_max) and the size of one video frame in pixels.
  c.data.max_patches = 16
  c.data.frame_height = 80
  c.data.frame_width = 80
  # Most text tokens the model writes in one micro-turn before `<eot>` (K_max).
  c.data.k_max = 8
  # K_max of text-only episodes, whose text (read at a reading rate) is denser than speech.
  c.data.text_only_k_max = 32
  # Grain read threads and prefetched batches.
  c.data.num_threads = 2
  c.data.prefetch = 4
  # Grain worker processes (0: threads of this process only). Rows are pure functions of their
  # indices, so the output is the same for any count.
  c.data.num_workers = 0
  c.data.synthetic = mlc.ConfigDict()
  # Words the synthetic user can say (word 0 is silence).
  c.data.synthetic.num_words = 12
  # Micro-turns per packed episode window.
  c.data.synthetic.min_window = 4
  c.data.synthetic.max_window = 16
  # Probability that a micro-turn has a video frame / a typed user text span.
  c.data.synthetic.video_prob = 0.3
  c.data.synthetic.typed_text_prob = 0.1

  c.optimizer = mlc.ConfigDict()
  # Peak learning rate, linear warmup steps, and the final fraction of it after cosine decay.
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.final_lr_fraction = 0.1
  # AdamW moments, epsilon and decoupled weight decay (not applied to norms and biases).
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  # Global-norm gradient clipping threshold (≤ 0 disables).
  c.optimizer.clip_norm = 1.0
  # Micro-batches accumulated per step; the global batch must be divisible by it.
  c.optimizer.grad_accum_steps = 1

  c.train = mlc.ConfigDict()
  # Total optimizer steps (also the length of the learning-rate schedule).
  c.train.num_steps = 300
  # Check every batch against the packed-batch contract on the host before it is sharded.
  c.train.check_batches = True
  # A step with a non-finite loss or gradient leaves the state unchanged (counted as
  # `bad_steps`); more than this many in a row saves a checkpoint and stops the run.
  c.train.max_consecutive_bad_steps = 5
  # A process in which no step finishes for this long (a peer stuck in a collective while its
  # heartbeats go on, a wedged data loader) logs every thread's stack and exits with an error;
  # its peers then fail through the heartbeat check. 0 disables. Compilation is not counted.
  c.train.step_timeout_s = 1800
  # Fault drill: steps (comma separated, e.g. "120,121") whose loss is made NaN on device, to check
  # the bad-step path of a deployment end to end. Empty in real runs.
  c.train.inject_nan_at_steps = ""

  c.init = mlc.ConfigDict()
  # Where a run whose workdir has no checkpoint starts (a workdir's own latest checkpoint always
  # wins): the full state of another run's latest checkpoint (a workdir or checkpoint directory)...
  c.init.resume_from = ""
  # ...else only the parameters of another run's latest checkpoint, with a fresh optimizer.
  # Parameters it lacks are initialized (and listed in the log); one whose leading (expert)
  # dimension grew gets the saved rows first; any other shape change is an error.
  c.init.params_from = ""
  # With params_from: parameter name prefixes to initialize fresh anyway, comma separated (e.g.
  # "text_head,text_embed" after a vocabulary change).
  c.init.reinit = ""

  c.eval = mlc.ConfigDict()
  # Full-duplex behaviour during training (`tmlx.eval.duplex`): every this many steps, and at the last
  # step, the first eval.conversations conversations of eval.data go through a streaming session (the
  # config's `stream` settings) and their scores are logged as duplex/* metrics next to the losses.
  # 0: never. The session runs on one device of each process, with a copy of the parameters.
  c.eval.every = 0
  # Held-out episode datasets (comma separated; a relative DIR is looked up as in data.mixture).
  c.eval.data = ""
  c.eval.conversations = 4
  # At the last step, also log what the user said in each turn and what the model and the reference
  # answered.
  c.eval.report = True

  c.checkpoint = mlc.ConfigDict()
  # Save every this many steps (and at the last step); 0 disables checkpoints.
  c.checkpoint.every = 100
  # Keep the latest this many checkpoints (at least 1).
  c.checkpoint.keep = 3
  # Also keep every checkpoint whose step is a multiple of this (0: none beyond the latest ones).
  c.checkpoint.keep_every = 0
  # Write checkpoints in a background thread while training goes on.
  c.checkpoint.async_save = True

  c.logging = mlc.ConfigDict()
  # Log metrics (JSONL, TensorBoard, progress line) every this many steps.
  c.logging.every = 10
  # Also write TensorBoard event files.
  c.logging.tensorboard = True
  # Each process logs a CRC32 of every global batch row its devices hold, per step: compare the
  # logs of two runs to check that they trained on the same rows (e.g. N processes against one).
  c.logging.row_digests = False

  c.profile = mlc.ConfigDict()
  # A jax.profiler trace of steps start_step .. start_step + num_steps - 1 (`tmlx.profiling`), in
  # <workdir>/profile/plugins/profile/<time>/<host>.xplane.pb (TensorBoard's profile plugin, XProf);
  # each step is inside a "train" step marker. 0: no trace. Start after the first few steps, whose
  # times are not typical (the first saves and data reads); keep the window short (a trace of a
  # large model is large).
  c.profile.start_step = 0
  c.profile.num_steps = 3
  # Processes that write a trace: comma-separated indices ("0,8"), or "all".
  c.profile.processes = "0"

  c.stream = mlc.ConfigDict()
  # Streaming sessions (tmlx.stream). Attention window in positions: each new position attends
  # to this many latest ones (itself included) and the KV cache is a ring of that size, so a
  # session runs for ever at a bounded cost per micro-turn; it must equal model.attention_window
  # when that is set. 0: attend to the whole session, in a cache of max_positions (a session that
  # would outgrow it stops with an error), as a model trained with full attention expects (but
  # only up to the data.seq_len positions it was trained on).
  c.stream.window = 0
  c.stream.max_positions = 8192
  # Positions of an input block (<mt>, typed text and background results, a frame's patches,
  # 4 AUDIO_IN) prefilled per call; longer blocks take several calls. Fixed: no recompilation.
  # Every call computes all of them, padding included, against the whole context: keep it
  # near the usual block (5 positions for audio only).
  c.stream.input_chunk = 16
  # Attention reads the filled part of the cache this many positions at a time (a divisor of
  # max_positions): larger means fewer loop trips, smaller less padding read.
  c.stream.attention_block = 512
  # Text sampling: temperature (0 = greedy) and nucleus top-p.
  c.stream.temperature = 0.0
  c.stream.top_p = 1.0
  # Audio: noise temperature τ of the flow head's x0 ~ N(0, τ²I), and Euler steps.
  c.stream.audio_temperature = 1.0
  c.stream.audio_steps = 10

  c.runtime = mlc.ConfigDict()
  # CPU runs only: the number of CPU devices JAX creates in each process (tmlx.main applies it
  # before JAX starts), so a one-machine run can use a multi-device mesh (the main job: 8 devices,
  # data=2 x expert=4). In a multi-process job the mesh spans processes x this many devices. It
  # does not limit threads or cores, and is ignored on GPU and TPU. 0: JAX's default (one device).
  c.runtime.cpu_devices = 0
  # Persistent compilation cache (`tmlx.compile_cache`): compiled programs are stored, and a later
  # start of the same program (a resume, a rerun) loads them instead of compiling. Programs that
  # compile in under a second are not stored (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS changes
  # that); only process 0 writes. False: compile every time.
  c.runtime.compile_cache = True
  # Its directory; empty: JAX_COMPILATION_CACHE_DIR if the environment sets it, else
  # <workdir>/compile_cache. One directory shared by the runs of a project compiles each program once.
  c.runtime.compile_cache_dir = ""
  return c


# Model sizes, in the manner of big_vision's `decode_variant`: one row per size, the dimensions that
# make a model that size, applied to a config by `apply_size`. A preset trains one size and tests
# with the tiny row of the same structure (its `tiny` argument); `size=NAME` on the command line
# trains the preset's recipe at another. Totals are parameters (`tmlx.nn.model.count_parameters`).
#   tiny       MODEL_SPEC.md §7's tiny model, base.py's defaults (3.2M, 2.0M active)
#   tiny-2l    tiny with 2 layers: what the tests of the CPU presets train (2.2M)
#   69m-tiny   69m's structure (top-2 of 8, no shared expert) at tiny widths (1.9M)
#   69m        1024 wide, a matmul-bound model for measuring CPU MFU (69M, 31M active)
#   276b-tiny  276b's structure (GQA 4:1, top-6 of 16, 2 shared, untied vocab) at tiny widths (2.0M)
#   276b       the full interaction model of MODEL_SPEC.md §7 (276.4B, 12.2B active)
SIZE_FIELDS = (
  "vocab_size",
  "d_model",
  "num_layers",
  "num_heads",
  "num_kv_heads",
  "head_dim",
  "stem_width",
  "moe.num_experts",
  "moe.num_experts_per_tok",
  "moe.num_shared_experts",
  "moe.d_ff",
  "flow.width",
  "flow.depth",
)
# fmt: off
SIZES = {
  #             vocab    d_model layers heads kv_heads head_dim stem  experts top_k shared d_ff  flow_width flow_depth
  "tiny":      (320,     128,    4,     4,    2,       32,      0,    8,      2,    1,     128,  128,       2),
  "tiny-2l":   (320,     128,    2,     4,    2,       32,      0,    8,      2,    1,     128,  128,       2),
  "69m-tiny":  (320,     128,    2,     4,    2,       32,      0,    8,      2,    0,     128,  64,        2),
  "69m":       (320,     1024,   2,     8,    2,       128,     0,    8,      2,    0,     1024, 128,       2),
  "276b-tiny": (320,     128,    2,     8,    2,       16,      32,   16,     6,    2,     64,   64,        2),
  "276b":      (131_072, 4096,   56,    32,   8,       128,     1024, 256,    6,    2,     1536, 1536,      8),
}
# fmt: on


def _file(preset: str) -> str:
  """A preset's `__file__` as its --config flag names it."""
  return f"experiments/{os.path.basename(preset)}"


def apply_size(c: mlc.ConfigDict, size: str, preset: str) -> mlc.ConfigDict:
  """Sets the model dimensions of `c` to the row `size` of SIZES; `preset` (the preset's __file__)
  names the file in the error."""
  if size not in SIZES:
    raise ValueError(f"{_file(preset)}: unknown size={size!r} (known: {', '.join(SIZES)})")
  for field, value in zip(SIZE_FIELDS, SIZES[size], strict=True):
    *parents, leaf = field.split(".")
    node = c.model
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _parse_value(text: str, default):
  if isinstance(default, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError("not a bool")
  return type(default)(text)  # int, float or str


def parse_arg(arg: str | None, preset: str, **spec) -> mlc.ConfigDict:
  """The argument of a preset's `get_config` (what follows the ':' of --config=FILE:ARG), in the
  manner of big_vision's `parse_arg`: comma-separated `key=value` pairs, a bare `key` meaning
  key=True ("tiny", "tiny,size=tiny", "size=69m"). `spec` gives each known key its default, whose
  type (bool, int, float or str) the value is read as; keys not given keep it. An unknown key or
  a value of the wrong type is a ValueError naming `preset` (the preset's __file__) and the key."""
  out = mlc.ConfigDict(spec)
  for item in (arg or "").split(","):
    if not item.strip():
      continue
    key, has_value, text = (s.strip() for s in item.partition("="))
    if key not in spec:
      known = ", ".join(sorted(spec)) or "none"
      raise ValueError(f"{_file(preset)}: unknown argument key {key!r} in {arg!r} (known: {known})")
    default = spec[key]
    if not has_value and not isinstance(default, bool):
      raise ValueError(f"{_file(preset)}: argument key {key!r} needs a value ({key}=...)")
    try:
      out[key] = _parse_value(text, default) if has_value else True
    except ValueError:
      raise ValueError(
        f"{_file(preset)}: bad value {text!r} for argument key {key!r} (expected {type(default).__name__})"
      ) from None
  return out


def cpu_test_run(c: mlc.ConfigDict) -> mlc.ConfigDict:
  """The short run of a CPU preset's `tiny` variant (for tests): 2 steps of 128 positions, metrics
  every step, a checkpoint every 2 steps, no duplex evaluation unless eval.every asks for one, and
  then of one conversation."""
  c.data.seq_len = 128
  c.train.num_steps = 2
  c.logging.every = 1
  c.checkpoint.every = 2
  c.eval.every = 0
  c.eval.conversations = 1
  return c
