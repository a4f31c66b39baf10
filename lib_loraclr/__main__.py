"""``python -m lib_loraclr SUBCOMMAND …``: a small dispatcher.

Each subcommand is a module with ``main(argv: list[str]) -> int`` that parses its own arguments; it is
imported only when called. To add one, add a line to :data:`SUBCOMMANDS`.

Errors: a `LoraclrError` (bad input) prints its one line ``error: …`` and exits 1; an interrupt (Ctrl+C)
prints ``interrupted; nothing was written`` and exits 130; any other exception prints its type and
message with a hint and exits 1. ``--debug`` (anywhere on the command line, or ``LORACLR_DEBUG=1``) shows
the stack trace too.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from lib_loraclr.errors import LoraclrError

#: name → (module, function, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "inspect": (
        "lib_loraclr.inspect",
        "main",
        "show architecture, format, ranks, keys and metadata of LoRA files",
    ),
    "merge": ("lib_loraclr.merge.cli", "main", "merge several concept LoRAs into one (LoRACLR)"),
    "demo": ("lib_loraclr.demo", "main", "run the bundled tiny demo"),
}


def usage() -> str:
    lines = ["usage: python -m lib_loraclr SUBCOMMAND [options]", "", "subcommands:"]
    width = max(len(n) for n in SUBCOMMANDS)
    lines += [f"  {n.ljust(width)}  {h}" for n, (_, _, h) in SUBCOMMANDS.items()]
    lines += ["", "python -m lib_loraclr SUBCOMMAND --help shows its options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    debug = "--debug" in argv or os.environ.get("LORACLR_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv:
        print(usage())
        return 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            print(f"subcommand {name!r} is not available in this version ({module} missing)", file=sys.stderr)
            return 2
        raise
    try:
        return int(getattr(mod, func)(rest) or 0)
    except LoraclrError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as e:  # disk full, permissions changed mid-run, out of memory
        if debug:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one line, the stack with --debug
        if debug:
            traceback.print_exc()
        print(
            f"error: unexpected {type(e).__name__}: {e} (this is a bug in lib_loraclr: rerun with --debug and "
            "report the stack trace)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
