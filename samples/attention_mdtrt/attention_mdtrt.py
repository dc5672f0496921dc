#!/usr/bin/env python3
"""Multi-device attention: the same as ``python -m mdtrt attention`` (see README.md).

    python attention_mdtrt.py --ranks 2                      # GPUs + TensorRT: full run and timing
    python attention_mdtrt.py --mode cpu --sequence-length 256   # CPU verification only
    mpirun -np 2 python attention_mdtrt.py                  # one process per GPU
"""

import os
import sys

from mdtrt.attention import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--hint" not in argv:  # this folder's hint.json, which is the package's default
        argv += ["--hint", os.path.join(os.path.dirname(os.path.abspath(__file__)), "hint.json")]
    sys.exit(main(argv))
