"""Names a config chooses among that start-up code checks before JAX is imported (the accelerator
rows of `config.mesh_rules`, `tmlx.runtime.accelerators`); the modules that act on them
(`tmlx.sharding`, `tmlx.nn.model`) map each name to what it does. No JAX here."""

from typing import Literal

MESH_AXES = ("data", "fsdp", "expert", "tensor")
Remat = Literal["none", "full", "dots"]  # activation rematerialization of each decoder block
MoETransport = Literal["local", "all_to_all", "ragged", "dropless"]  # how tokens reach their experts (tmlx.nn.moe)
