"""Shapes are written once and checked (STYLE.md item 5).

The static half reads every `tmlx/nn` file: its docstring's dimension legend agrees with
`tmlx.nn.dims.LEGEND`, and its einsums, jaxtyping annotations and shape comments use only the
letters of that legend.

The runtime half (`test_hooked_*`) runs the model, attention, the MoE layer and the flow head with
every `tmlx.nn` function and dataclass checked by beartype through jaxtyping's import hook, so a
call whose shapes disagree with its annotations fails with an error that names the dimension. The
hook has to be installed before `tmlx.nn` is first imported, so those tests run in a fresh pytest
process that `test_annotations_hold_under_the_import_hook` starts with jaxtyping's pytest option
(in any other session they are skipped). Run them by hand with
  python -m pytest --jaxtyping-packages=tmlx.nn,beartype.beartype tests/test_shapes.py -k hooked
"""

import ast
import io
import pathlib
import re
import subprocess
import sys
import tokenize

import jax
import jax.numpy as jnp
import jaxtyping
import pytest
from flax import nnx

from tmlx.nn import attention, dims

ROOT = pathlib.Path(__file__).resolve().parents[1]
NN_FILES = sorted(p for p in (ROOT / "tmlx" / "nn").glob("*.py") if p.name not in ("__init__.py", "dims.py"))
HOOK_OPTION = "--jaxtyping-packages=tmlx.nn,beartype.beartype"
# Whether this process imported tmlx.nn under the import hook (jaxtyped wraps every function).
HOOKED = hasattr(attention.attention_mask, "__wrapped__")
STYLE_LETTERS = "B S T L D F N K G H E C P V W M Q".split()


def _unchecked_pytree_constructors():
  """JAX rebuilds pytree dataclasses (KVCache, MoEStats, ...) with whatever leaves it maps over them
  (None, ShapeDtypeStruct, PartitionSpec), so under the hook their constructors go unchecked; the
  functions that build and take them, and the config dataclasses, stay checked."""
  for name, module in list(sys.modules.items()):
    if name.startswith("tmlx.nn."):
      for cls in vars(module).values():
        if isinstance(cls, type) and cls.__module__ == name and getattr(cls, "_flax_dataclass", False):
          cls.__init__ = getattr(cls.__init__, "__wrapped__", cls.__init__)


if HOOKED:
  _unchecked_pytree_constructors()


def _legend(path: pathlib.Path) -> dict[str, str]:
  return dims.parse_legend(ast.get_docstring(ast.parse(path.read_text()), clean=False) or "")


def _jaxtyping_names(tree: ast.Module) -> set[str]:
  """The dtype-array names (Float, Int, ...) a file imports from jaxtyping."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == "jaxtyping":
      names |= {a.asname or a.name for a in node.names}
  return names - {"Array", "ArrayLike", "PyTree", "jaxtyped"}


def _einsum_specs(tree: ast.Module) -> list[str]:
  return [
    node.args[0].value
    for node in ast.walk(tree)
    if isinstance(node, ast.Call)
    and isinstance(node.func, ast.Attribute)
    and node.func.attr == "einsum"
    and node.args
    and isinstance(node.args[0], ast.Constant)
  ]


def _annotation_specs(tree: ast.Module) -> list[str]:
  """The shape strings of every `Float[Array, "B S D"]`-style annotation."""
  names = _jaxtyping_names(tree)
  return [
    node.slice.elts[1].value
    for node in ast.walk(tree)
    if isinstance(node, ast.Subscript)
    and isinstance(node.value, ast.Name)
    and node.value.id in names
    and isinstance(node.slice, ast.Tuple)
    and len(node.slice.elts) == 2
    and isinstance(node.slice.elts[1], ast.Constant)
  ]


def _annotation_letters(spec: str) -> set[str]:
  """Letters a jaxtyping shape string names: `*lead` (pass-through dims), `...`, `_` and sizes aside."""
  letters = set()
  for dim in spec.split():
    dim = dim.lstrip("*#?")
    if dim in ("...", "_", "lead") or dim.isdigit():
      continue
    if "=" in dim:  # `M=80`: a fixed size under its letter
      dim = dim.split("=")[0]
    letters |= set(re.findall(r"[A-Za-z_]\w*", dim))
  return letters


def _shape_texts(source: str, tree: ast.Module) -> list[str]:
  """Comments and docstrings, where shapes are written as `[B, S, D]`."""
  texts = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
  for node in ast.walk(tree):
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
      texts.append(ast.get_docstring(node, clean=False) or "")
  return texts


def _shape_letters(text: str) -> set[str]:
  """Capital letters standing alone inside shape brackets: `[B, S·G, D]`, `[..., Y]`, `[E]`."""
  letters = set()
  for inner in re.findall(r"\[([^\[\]]*)\]", text):
    first = inner.split(",")[0].strip()
    if re.fullmatch(r"\.{2,3}|[A-Za-z](?:[·/ =].*)?", first):
      letters |= set(re.findall(r"(?<![\w.'`])[A-Z](?![\w'`])", inner))
  return letters


# --- The legend, read from the files ----------------------------------------------------------


def test_the_project_legend_has_one_meaning_per_letter():
  assert all(re.fullmatch(r"[A-Z]", k) for k in dims.LEGEND), dims.LEGEND
  assert set(STYLE_LETTERS) <= set(dims.LEGEND), "STYLE.md item 5's letters are all in the legend"
  assert len(set(dims.LEGEND.values())) == len(dims.LEGEND), "two letters share a meaning"
  for letter, meaning in dims.LEGEND.items():
    assert meaning and "; " not in meaning and not meaning.endswith("(local)"), (letter, meaning)


@pytest.mark.parametrize("path", NN_FILES, ids=lambda p: p.name)
def test_each_file_starts_with_a_legend_in_the_project_letters(path):
  legend = _legend(path)
  assert legend, f"{path.name}: its docstring has no 'Dimensions:' block (the layout of tmlx/nn/dims.py)"
  for letter, meaning in legend.items():
    if meaning.endswith("(local)"):
      assert letter not in dims.LEGEND, f"{path.name}: local letter {letter} already means {dims.LEGEND[letter]!r}"
    else:
      assert letter in dims.LEGEND, f"{path.name}: {letter} is in no legend; add it to dims.py or mark it (local)"
      assert meaning.split("; ")[0] == dims.LEGEND[letter], (
        f"{path.name}: {letter} = {meaning!r}, but the project legend says {dims.LEGEND[letter]!r}"
      )


def test_a_local_letter_is_in_no_other_legend():
  legends = {path.name: _legend(path) for path in NN_FILES}
  for name, legend in legends.items():
    for letter, meaning in legend.items():
      if meaning.endswith("(local)"):
        others = [other for other, theirs in legends.items() if other != name and letter in theirs]
        assert not others, f"{letter} is local to {name} ({meaning!r}) but also in the legend of {others}"


@pytest.mark.parametrize("path", NN_FILES, ids=lambda p: p.name)
def test_einsums_annotations_and_shape_comments_use_the_file_legend(path):
  source = path.read_text()
  tree = ast.parse(source)
  legend = set(_legend(path))
  specs = _einsum_specs(tree)
  for spec in specs:
    letters = {c.upper() for c in spec if c.isalpha()}
    assert letters <= legend, f"{path.name}: einsum {spec!r} uses {sorted(letters - legend)}, not in its legend"
  for spec in _annotation_specs(tree):
    letters = _annotation_letters(spec)
    assert letters <= legend, f"{path.name}: annotation {spec!r} uses {sorted(letters - legend)}, not in its legend"
  for text in _shape_texts(source, tree):
    letters = _shape_letters(text)
    assert letters <= legend, f"{path.name}: a shape in {text[:60]!r}... uses {sorted(letters - legend)}"


def test_the_readers_see_what_they_check():
  """The parsers above find what the files hold (a guard against a test that checks nothing)."""
  tree = ast.parse((ROOT / "tmlx" / "nn" / "moe.py").read_text())
  assert "bsd,de->bse" in _einsum_specs(tree)
  assert "B S D" in _annotation_specs(tree)
  assert _annotation_letters("*#lead B S*G _ H//2 M=80 40") == {"B", "S", "G", "H", "M"}
  assert _shape_letters("x [B, S·G, D] → [..., Y]; E_bag[w, m, bin]; [0, 1]; [e, X (shard), b]") == set("BSGDYX")
  doc = "Title.\n\nDimensions:\n  B  batch\n  R  rows; here B·S\n  Ω  no\n  Z  draws (local)\n\n  C  not in the block"
  assert dims.parse_legend(doc) == {"B": "batch", "R": "rows; here B·S", "Z": "draws (local)"}


def test_annotations_hold_under_the_import_hook():
  """Runs the `test_hooked_*` tests below in a fresh process with the import hook installed."""
  if HOOKED:
    pytest.skip("this session already runs under the import hook")
  pytest_args = ["-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider", HOOK_OPTION, __file__, "-k", "hooked"]
  cmd = [sys.executable, "-m", "pytest", *pytest_args]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  out = r.stdout + r.stderr
  assert r.returncode == 0, out[-6000:]
  assert re.search(r"\b[1-9]\d* passed", out) and "skipped" not in out, out[-3000:]


# --- Under the import hook (a fresh process) ---------------------------------------------------

hooked = pytest.mark.skipif(not HOOKED, reason="runs in the process test_annotations_hold_under_the_import_hook starts")


def _type_error(fn, *args, **kwargs) -> str:
  with pytest.raises(jaxtyping.TypeCheckError) as info:
    fn(*args, **kwargs)
  return str(info.value)


@hooked
def test_hooked_model_forward_and_streaming_step():
  from tests.helpers import synthetic_batch, tiny_config, tiny_model
  from tmlx.nn.flow_head import flow_matching_loss, sample

  model = tiny_model()
  batch = synthetic_batch(tiny_config("tiny"), rows=2)
  b, s = batch["tokens"].shape
  cfg = model.cfg
  out = nnx.jit(lambda m, x: m(x))(model, batch)
  assert out.hidden.shape == (b, s, cfg.d_model)
  assert out.moe.expert_load.shape == (cfg.num_layers, cfg.moe.num_experts)
  assert model.text_logits(out.hidden[:, :3]).shape == (b, 3, cfg.vocab_size)
  h = out.hidden[:, :3]
  loss = flow_matching_loss(model.flow_head, h, jnp.zeros((b, 3, cfg.mel_dim)), jax.random.key(0))
  assert loss.shape == (b, 3)
  assert sample(model.flow_head, h, jax.random.key(1), steps=2).shape == (b, 3, cfg.mel_dim)

  # The streaming step: 8 new positions into a 32-slot cache.
  chunk = {k: v if k in ("patches", "patch_rowcol") else v[:, :8] for k, v in batch.items()}
  cache = model.empty_cache(b, 32)
  hidden, cache = nnx.jit(lambda m, c, kv: m.extend(c, kv, jnp.int32(0), block=16))(model, chunk, cache)
  assert hidden.shape == (b, 8, cfg.d_model)
  assert cache.k.shape == (cfg.num_layers, b, cfg.num_kv_heads, 32, cfg.head_dim)

  # dMel with 81 mel channels: the dMel stem's annotation (M=80) names the dimension.
  wrong = dict(batch, dmel=jnp.zeros((b, s, cfg.frames_per_position, 81), batch["dmel"].dtype))
  msg = _type_error(nnx.jit(lambda m, x: m(x)), model, wrong)
  assert "DmelBagEmbed.__call__" in msg and "parameter 'dmel'" in msg and "M=80" in msg, msg


@hooked
def test_hooked_attention():
  from tmlx.nn.common import Dtypes

  with nnx.use_eager_sharding(False):
    attn = attention.Attention(16, 4, 2, 8, qk_norm=True, eps=1e-6, rngs=nnx.Rngs(0), dtypes=Dtypes())
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  seg = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  rope = attention.rope_angles(jnp.broadcast_to(jnp.arange(6), (2, 6)), 8, 10_000.0)
  mask = attention.attention_mask(seg)
  assert mask.shape == (2, 6, 6)
  assert nnx.jit(lambda m, x, seg, mask, rope: m(x, seg, rope, mask))(attn, x, seg, mask, rope).shape == (2, 6, 16)
  assert nnx.jit(lambda m, x, seg, rope: m(x, seg, rope))(attn, x, seg, rope).shape == (2, 6, 16)

  # Segment ids and a mask of another batch: B is bound to 2 by x.
  msg = _type_error(attn, x, jnp.ones((3, 6), jnp.int32), rope)
  assert "parameter 'segment_ids'" in msg and "B=2" in msg, msg
  msg = _type_error(attn, x, seg, rope, attention.attention_mask(jnp.ones((3, 6), jnp.int32)))
  assert "parameter 'mask'" in msg and "B=2" in msg, msg
  # Rotary angles for head dim 6, not 8: apply_rope's `H//2` catches it.
  bad_rope = attention.rope_angles(jnp.broadcast_to(jnp.arange(6), (2, 6)), 6, 10_000.0)
  msg = _type_error(attn, x, seg, bad_rope)
  assert "apply_rope" in msg and "parameter 'sin'" in msg and "H=8" in msg, msg


@hooked
@pytest.mark.parametrize("transport", ["local", "ragged"])
def test_hooked_moe(transport):
  from tmlx.nn.common import Dtypes
  from tmlx.nn.moe import MoE, MoEConfig

  cfg = MoEConfig(
    num_experts=4,
    num_experts_per_tok=2,
    num_shared_experts=1,
    d_ff=8,
    capacity_factor=1.0,
    renormalize=True,
    transport=transport,
  )
  with nnx.use_eager_sharding(False):
    moe = MoE(16, cfg, rngs=nnx.Rngs(0), dtypes=Dtypes())
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  mask = jnp.arange(8)[None] < jnp.array([[8], [5]])
  y, stats = nnx.jit(lambda m, x: m(x, mask))(moe, x)
  assert y.shape == x.shape and stats.expert_load.shape == (4,)
  assert moe.decode(x[:, :1]).shape == (2, 1, 16)

  msg = _type_error(moe, x, jnp.ones((2, 9), bool))
  assert "parameter 'mask'" in msg and "S=8" in msg, msg


@hooked
def test_hooked_flow_head():
  from tmlx.nn.common import Dtypes
  from tmlx.nn.flow_head import FlowConfig, FlowHead, flow_matching_loss

  cfg = FlowConfig(width=32, depth=2, num_draws=3, t_sampling="logit_normal", sigma_min=1e-4)
  with nnx.use_eager_sharding(False):
    head = FlowHead(16, 40, cfg, rngs=nnx.Rngs(0), dtypes=Dtypes())
  h = jax.random.normal(jax.random.key(0), (2, 5, 16))
  x1 = jnp.zeros((2, 5, 40))
  loss = nnx.jit(lambda m: flow_matching_loss(m, h, x1, jax.random.key(1)))(head)
  assert loss.shape == (2, 5)

  # Times for another set of targets than x_t's: the leading dims `*lead` disagree.
  msg = _type_error(head, x1, jnp.zeros((2, 4)), h)
  assert "parameter 't'" in msg and "lead=(2, 5)" in msg, msg
