"""``python -m xmx.data check <root> [--json] [--datasets a,b]``: the dataset checker."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "check":
        print("usage: python -m xmx.data check <root> [--json] [--datasets name,...]", file=sys.stderr)
        return 2
    from xmx.data.check import main as check_main
    return check_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
