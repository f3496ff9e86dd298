"""``edgetl`` command line: a thin layer over the Python API.

Errors caused by the user's input (:class:`~edgetl.errors.EdgetlError`) are printed as one
``edgetl: error: ...`` line with exit code 2; ``--debug`` shows the traceback instead. Any other
exception is a bug and keeps its traceback.

Thread policy: ``main`` sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the user set it) before torch is
imported. OpenMP workers that spin while waiting make small CPU workloads 10-100x slower whenever
another process holds a core (a phone or a Pi is never idle); sleeping workers cost little. It is
read once, when torch's OpenMP runtime loads, so it is the command's decision, not the library's:
Python API users set it in their own environment.

Allocator: ``edgetl finetune`` runs on the ``malloc`` its ``--allocator`` names (default ``glibc``;
``auto``: jemalloc where installed; :mod:`edgetl._allocator`). The loader links ``malloc`` once, so the
command re-executes itself with ``LD_PRELOAD`` set, first thing, before torch loads; only when
``main`` reads the real command line (``argv=None``), never in a Python caller's process.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    """The ``edgetl`` parser with every sub-command (each sets ``handler``)."""
    from edgetl.cli.export import add_export_parser
    from edgetl.cli.finetune import add_finetune_parser
    from edgetl.cli.fleet import add_fleet_parser
    from edgetl.cli.profile import add_plan_parser, add_profile_parser

    parser = argparse.ArgumentParser(prog="edgetl", description="On-device transfer learning with inverted residual blocks (MobileTL)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    add_finetune_parser(sub)
    add_profile_parser(sub)
    add_plan_parser(sub)
    add_export_parser(sub)
    add_fleet_parser(sub)
    return parser


def _run_on_allocator(argv: list[str]) -> None:
    """Re-execute ``edgetl finetune`` on the allocator it asks for, unless it runs on it already."""
    from edgetl._allocator import ALLOCATORS, DEFAULT, reexec_argv, resolve
    from edgetl.errors import EdgetlError

    words = [a for a in argv if not a.startswith("-")]
    if not words or words[0] != "finetune":
        return
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--allocator", default=DEFAULT)
    name = pre.parse_known_args(argv)[0].allocator
    if name not in ALLOCATORS:
        return  # the real parser refuses it with the choices
    try:
        allocator = resolve(name)
    except EdgetlError as exc:
        print(f"edgetl: error: {exc}", file=sys.stderr)
        sys.exit(2)
    new_argv = reexec_argv(allocator, argv)
    if new_argv:
        sys.stdout.flush()
        os.execve(sys.executable, new_argv, allocator.env())


#: what an interrupted command leaves and how it continues (a fleet's server resumes after its last saved round)
_ON_INTERRUPT = {
    "finetune": "the last completed epoch is saved; continue with --resume",
    "fleet simulate": "the completed rounds are saved in --out; the same command continues after the last one",
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see the module docstring
    if argv is None:
        _run_on_allocator(sys.argv[1:])  # before torch loads; see the module docstring
    from edgetl.errors import EdgetlError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except EdgetlError as exc:
        if args.debug:
            raise
        print(f"edgetl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = _ON_INTERRUPT.get(" ".join(filter(None, (getattr(args, "command", None), getattr(args, "fleet_command", None)))))
        print(f"edgetl: interrupted{f' ({hint})' if hint else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
