"""The README's commands and CI stay in step."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  commands = re.findall(r"```bash\n(.+?)\n```", readme)
  assert len(commands) == 2, "the README gives exactly two commands"
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert ci == commands[1]
  assert "tmlx.main --config=experiments/sample_cpu.py" in commands[0]


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph(top_level_only: bool) -> dict[str, set[str]]:
  """{module: the project modules it imports} over tmlx/, data_pipelines/ and experiments/; with
  `top_level_only`, only the imports that run when the module is imported (not inside functions)."""
  import ast

  files = [p for pkg in ("tmlx", "data_pipelines", "experiments") for p in (ROOT / pkg).rglob("*.py")]
  modules = {_module_name(p): p for p in files}
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    tree = ast.parse(path.read_text(), str(path))
    # Imports under `if TYPE_CHECKING:` never run.
    checking_only = {
      id(n)
      for node in ast.walk(tree)
      if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
      for child in node.body
      for n in ast.walk(child)
    }
    nodes = [n for n in (tree.body if top_level_only else ast.walk(tree)) if id(n) not in checking_only]
    targets: set[str] = set()
    for node in nodes:
      if isinstance(node, ast.Import):
        targets |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        targets.add(node.module)
        targets |= {f"{node.module}.{a.name}" for a in node.names}
    edges = set()
    for t in targets:
      while t and t not in modules:  # `import tmlx.nn.model` imports tmlx.nn.model; `from tmlx import x` x or tmlx
        t = t.rpartition(".")[0]
      if t and t != name:
        edges.add(t)
    # Importing a.b.c runs the packages a and a.b first.
    for t in list(edges):
      parts = t.split(".")
      edges |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules}
    edges.discard(name)
    graph[name] = {e for e in edges if not name.startswith(e + ".")}  # a package's own parents run first anyway
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_no_import_cycles():
  cycle = _cycle(_import_graph(top_level_only=False))
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_serving_imports_neither_the_trainer_nor_the_data_pipeline():
  import subprocess
  import sys

  code = (
    "import sys; import tmlx.inference, tmlx.stream, tmlx.runtime.accelerators; "
    "print(sorted(m for m in sys.modules if m in ('tmlx.train', 'tmlx.config', 'data_pipelines.pipeline') "
    "or m.split('.')[0] == 'grain'))"
  )
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_accelerator_detection_runs_before_jax_is_imported():
  import subprocess
  import sys

  # The pod preset's rows are checked and one is applied, as tmlx.main does before JAX starts.
  apply = (
    "from experiments import interaction_276b as p; from tmlx.runtime import accelerators as a; "
    "print(a.apply(p.get_config(), accelerator='tpu v5p-512', environ={}))"
  )
  loaded = "sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax'})"
  code = f"import sys; {apply}; print({loaded})"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.split() == ["tpu_v5p", "[]"], out.stdout


def test_the_package_exports_what_a_researcher_needs():
  import tmlx
  from tmlx.checkpoint import Checkpointer
  from tmlx.inference import load_model
  from tmlx.nn.model import InteractionModel, ModelConfig
  from tmlx.stream import Session
  from tmlx.train import run

  assert (tmlx.run, tmlx.load_model, tmlx.Checkpointer) == (run, load_model, Checkpointer)
  assert (tmlx.Session, tmlx.InteractionModel, tmlx.ModelConfig) == (Session, InteractionModel, ModelConfig)


def test_no_module_is_over_500_lines():
  """One concept per file (STYLE.md): a module that grows past 500 lines is split, not stretched."""
  long = {
    str(p.relative_to(ROOT)): n
    for pkg in ("tmlx", "data_pipelines", "experiments")
    for p in (ROOT / pkg).rglob("*.py")
    if (n := len(p.read_text().splitlines())) > 500
  }
  assert not long, f"modules over 500 lines: {long}"
