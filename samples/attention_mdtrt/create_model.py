#!/usr/bin/env python3
"""Write the single-device attention model and its sharded multi-device version.

    python create_model.py --output-dir . --ranks 2            # the sample's sizes
    python create_model.py --hidden 256 --heads 4 --head-dim 64 --dtype float32
    python create_model.py --ranks 4 --strategy ulysses

For allgather_kv the sharded model is what ``polygraphy multi-device shard attention_sd.onnx -s
hint.json -o attention_md.onnx`` writes, with the outputs' original names restored and nodes
sorted; ulysses and ring are mdtrt's rewrites (``mdtrt.context_parallel``).
"""

import argparse
import os
import sys

import onnx

import mdtrt.attention as attention
from mdtrt import MdtrtError
from mdtrt.attention_cli import non_negative_int, positive_int, prepare_output_dir, ranks_for
from mdtrt.sharding import STRATEGIES, check_hints, load_hints, shard


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=".",
                        help="folder to write attention_sd.onnx and attention_md.onnx to, created if missing (default: "
                        "the current folder, '.'); at the default sizes each model is 128 MiB")
    parser.add_argument("--ranks", type=positive_int, default=None,
                        help="number of ranks (default: the hints' dist_collectives.nb_rank, else 2)")
    parser.add_argument("--hint", default=None, help=f"sharding hints (default: {os.path.join(here, 'hint.json')} "
                        "for --ranks ranks)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=None,
                        help="context-parallel strategy (default: the hints' \"strategy\" field, else allgather_kv)")
    parser.add_argument("--hidden", type=positive_int, default=4096)
    parser.add_argument("--heads", type=positive_int, default=32)
    parser.add_argument("--head-dim", type=positive_int, default=128)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    args = parser.parse_args(argv)

    try:
        # Everything that can be refused is refused before the model is built.
        hints = load_hints(args.hint) if args.hint else None
        ranks = ranks_for(args, hints)
        hints = hints if hints is not None else attention.default_hints(ranks)
        check_hints(hints, args.strategy)
        prepare_output_dir(args.output_dir, "--output-dir")
        config = attention.AttentionConfig(args.hidden, args.heads, args.head_dim, args.dtype, args.seed)
        single = attention.create_attention_model(config)
        multi = shard(single, hints, ranks, strategy=args.strategy)
    except MdtrtError as error:
        print(f"error: {error}")
        return 2
    for name, model in (("attention_sd.onnx", single), ("attention_md.onnx", multi)):
        path = os.path.join(args.output_dir, name)
        onnx.save(model, path)
        collectives = sum(node.op_type == "DistCollective" for node in model.graph.node)
        print(f"wrote {path}: {len(model.graph.node)} nodes, {collectives} DistCollective")
    return 0


if __name__ == "__main__":
    sys.exit(main())
