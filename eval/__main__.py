"""`python -m eval extrapolation|passkey [args]`: the same as `python -m eval.extrapolation` / `eval.passkey`."""

import sys

from .cli import run_cli

COMMANDS = ("extrapolation", "passkey")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m eval {{{','.join(COMMANDS)}}} [--help | arguments]\n"
              "  extrapolation  perplexity and accuracy by eval length for each position scheme\n"
              "  passkey        passkey retrieval accuracy by length and depth", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "extrapolation":
        from .extrapolation import main as command
    else:
        from .passkey import main as command
    return run_cli(lambda: command(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
