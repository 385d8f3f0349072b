"""Errors raised across layers, in a module that imports nothing: start-up code
(`tmlx.runtime`) raises them before JAX or flax are imported."""


class ConfigError(ValueError):
  """An invalid experiment config."""
