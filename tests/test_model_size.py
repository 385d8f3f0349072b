"""The full 276B-A12B config, built abstractly (jax.eval_shape only)."""

from flax import nnx

from experiments import interaction_276b
from tmlx.nn.model import ModelConfig, count_parameters
from tmlx.state import new_model


def test_interaction_276b_is_276b_total_12b_active():
  config = interaction_276b.get_config()
  cfg = ModelConfig.from_config(config.model)
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: new_model(cfg, 0))))
  total, active = count_parameters(abstract, cfg)
  assert abs(total - 276e9) / 276e9 < 0.01, f"total {total / 1e9:.2f}B"
  assert abs(active - 12e9) / 12e9 < 0.05, f"active {active / 1e9:.2f}B"
  # The routed experts dominate: 256 experts x 56 layers x 3 x 4096 x 1536.
  experts = abstract["blocks"]["moe"]["w_up"]
  assert experts.shape == (56, 256, 4096, 1536)
