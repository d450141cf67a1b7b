"""``drlora train`` under ``torchrun`` with DeepSpeed's JIT-built CPU ops skipped.

``python -m torch.distributed.run --nproc_per_node 2 tests/distributed/ds_train_cli.py train ...
--parallel zero2``: the same command line as ``-m drlora_kernels``, after
:func:`~tests.distributed.ds_common.quiet_deepspeed` (minutes of C++ compile on a cold machine
otherwise; the processes then talk through plain gloo).
"""

from __future__ import annotations

import sys

from tests.distributed.ds_common import quiet_deepspeed

if __name__ == "__main__":
    quiet_deepspeed()
    from drlora_kernels import cli

    sys.exit(cli.main(sys.argv[1:]))
