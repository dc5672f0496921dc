#!/usr/bin/env python3
"""Multi-device attention: the same as ``python -m mdtrt attention`` (see README.md).

    python attention_mdtrt.py --ranks 2                                # GPUs + TensorRT: run and timing
    python attention_mdtrt.py --mode cpu --strategy ulysses            # CPU verification only
    python attention_mdtrt.py --hint hint.json --strategy ring         # this folder's hints
    mpirun -np 2 python attention_mdtrt.py                             # one process per GPU

The command line and the GPU run are in the installed package (``mdtrt.attention_cli``), because
the wheel does not carry this folder and ``mdtrt attention`` must work after ``pip install``.
Without ``--hint`` the hints are this folder's ``hint.json`` for ``--ranks`` ranks
(``mdtrt.attention.default_hints``).
"""

import os
import sys

from mdtrt.attention_cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python " + os.path.basename(sys.argv[0])))
