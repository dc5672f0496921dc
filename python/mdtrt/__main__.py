"""Command line: ``python -m mdtrt <command>`` (also installed as ``mdtrt``)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """``python -m mdtrt doctor [--json]`` or ``python -m mdtrt attention ...``.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The process exit status: doctor's (0 when multi-device inference can run here, else 1), the
        attention sample's, 2 without a command (the help, listing the commands, goes to stderr),
        130 after Ctrl-C (the shell's convention for SIGINT: 128 + 2), or 141 when the reader of
        its output went away (``doctor --json | head``: 128 + SIGPIPE's 13).
    """
    try:
        return _run(argv)
    except KeyboardInterrupt:
        # One line, not a traceback: an interrupted sample is the user's choice, not a failure to
        # debug (the GPU work of mdtrt's own calls was aborted by the call that saw the Ctrl-C).
        print("mdtrt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (`| head`) has what it wanted: no traceback. Python flushes stdout again at
        # exit, which would raise once more: point it at /dev/null first (Python's documented recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mdtrt",
                                     description="Multi-device TensorRT inference on the GPUs of one host.")
    sub = parser.add_subparsers(dest="command")
    doctor = sub.add_parser("doctor", help="report NCCL, CUDA, GPUs, peer access and TensorRT; exit 1 if multi-device inference cannot run here")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_parser("attention", add_help=False,
                   help="context-parallel attention sample: shard, verify on simulated ranks (CPU), run on GPUs "
                        "(`mdtrt attention --help` for its options)")
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        # No command: the commands there are, not only "the following arguments are required".
        parser.print_help(sys.stderr)
        return 2
    if args.command == "doctor":
        if rest:
            doctor.error(f"unrecognized arguments: {' '.join(rest)}")  # doctor's usage, not the top level's
        from .doctor import main as doctor_main

        return doctor_main(as_json=args.json)
    if args.command == "attention":
        from .attention_cli import main as attention_main

        return attention_main(rest)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
