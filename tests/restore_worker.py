"""One process of a multi-process restore (tests/test_sharding.py): restore a params checkpoint
onto a (2, 2, 2) mesh spanning every process, print the sum of all params."""

import argparse

import jax
import numpy as np

from spacejax import checkpoint, sharding
from spacejax.config import MeshConfig

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("--coordinator")
parser.add_argument("--num-processes", type=int)
parser.add_argument("--process-id", type=int)
args = parser.parse_args()

sharding.initialize(args.coordinator, args.num_processes, args.process_id)
mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
cfg = checkpoint.load_config(args.checkpoint)
_, params = checkpoint.load_params(args.checkpoint, sharding.param_shardings(cfg, mesh))
assert all(not leaf.is_fully_addressable for leaf in jax.tree.leaves(params)), "expected a global mesh"
total = sum(float(np.asarray(sharding.to_host(leaf), np.float64).sum()) for leaf in jax.tree.leaves(params))
print(f"process {jax.process_index()} of {jax.process_count()}: checksum {total:.6f}", flush=True)
