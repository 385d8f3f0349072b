"""tmlx: a JAX training framework for full-duplex multimodal interaction models.

What a researcher needs, importable from here (each loaded on first use, so `import tmlx` stays
cheap and start-up code can import `tmlx.runtime` before JAX):
  run             train an experiment config in a workdir (tmlx.train)
  load_model      a model and its resolved config from a checkpoint (tmlx.inference)
  Checkpointer    read, write and inspect checkpoints (tmlx.checkpoint)
  Session         a live conversation with a model, micro-turn by micro-turn (tmlx.stream)
  InteractionModel, ModelConfig   the model (tmlx.nn)
"""

from tmlx import lazy

__version__ = "0.1.0"

__getattr__, __all__ = lazy.exports(
  __name__,
  {
    "Checkpointer": "tmlx.checkpoint",
    "InteractionModel": "tmlx.nn.model",
    "ModelConfig": "tmlx.nn.model",
    "Session": "tmlx.stream.session",
    "load_model": "tmlx.inference",
    "run": "tmlx.train",
  },
)
