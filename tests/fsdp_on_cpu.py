"""`python -m palm` for CPU processes under accelerate's FSDP plugin (test use only).

accelerate enables its FSDP plugin only on accelerator back-ends (its state turns MULTI_GPU, NPU,
XPU, ... into FSDP, never MULTI_CPU), although torch's `fully_shard` runs on CPU with gloo. This
launcher makes that one switch, so that the tests can run `palm train` sharded by FSDP2 on a
machine without a GPU; everything else is accelerate's and palm's own code path.
"""
import sys

import accelerate.state
from accelerate.state import AcceleratorState, DistributedType, PartialState

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from palm.cli import main

    sys.exit(main(sys.argv[1:]))
