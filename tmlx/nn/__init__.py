"""Flax NNX modules of the interaction model."""

from tmlx.nn.attention import Attention, attention_mask
from tmlx.nn.embed import DmelBagEmbed, HMLPStem, TextEmbed
from tmlx.nn.flow_head import FlowConfig, FlowHead, flow_matching_loss, sample
from tmlx.nn.model import InteractionModel, ModelConfig, ModelOutput
from tmlx.nn.moe import MoE, MoEConfig, MoEStats

__all__ = [
  "Attention",
  "DmelBagEmbed",
  "FlowConfig",
  "FlowHead",
  "HMLPStem",
  "InteractionModel",
  "MoE",
  "MoEConfig",
  "MoEStats",
  "ModelConfig",
  "ModelOutput",
  "TextEmbed",
  "attention_mask",
  "flow_matching_loss",
  "sample",
]
