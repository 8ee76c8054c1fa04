"""Logical axis names and the rules that map them to the mesh axes ('data', 'fsdp', 'tensor').

model.py names every parameter's dims (`vocab, embed, mlp, heads, kv_heads, head_dim, norm,
layers`) and its activations' batch dim; `LOGICAL_RULES` decides which mesh axes split each. A
dim that its mesh axes do not divide, or whose axes the mesh lacks, stays replicated, so tiny
models run on any mesh. sharding.py builds the NamedShardings of params and batches from these.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
from jax.sharding import PartitionSpec

from spacejax.config import BATCH_AXES

LOGICAL_RULES: dict[str, Optional[tuple[str, ...]]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "vocab": ("tensor",),
    "length": None,
    "head_dim": None,
    "layers": None,
    "norm": None,
}


def spec_for(logical: Sequence[Optional[str]], shape: Sequence[int], mesh) -> PartitionSpec:
    """Logical axis names of an array -> a PartitionSpec on `mesh` (a Mesh or an AbstractMesh),
    replicating dims that their mesh axes do not divide or whose axes the mesh lacks."""
    spec = []
    for name, size in zip(logical, shape):
        axes = LOGICAL_RULES.get(name) if name is not None else None
        if axes and set(axes) <= set(mesh.axis_names) and size % math.prod(mesh.shape[a] for a in axes) == 0:
            spec.append(axes if len(axes) > 1 else axes[0])
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical: Sequence[Optional[str]]) -> jax.Array:
    """Pin the layout of `x` by the logical names of its dims on the mesh in context
    (`jax.set_mesh`), as `spec_for` maps them; the identity without a mesh in context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(logical, x.shape, mesh))
