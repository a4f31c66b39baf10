"""``python -m lib_loraclr SUBCOMMAND …``: a small dispatcher.

Each subcommand is a module with ``main(argv: list[str]) -> int`` that parses its own arguments; it is
imported only when called. To add one, add a line to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import importlib
import sys

from lib_loraclr.errors import LoraclrError

#: name → (module, function, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "inspect": ("lib_loraclr.inspect", "main", "show architecture, format, ranks, keys and metadata of LoRA files"),
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
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
