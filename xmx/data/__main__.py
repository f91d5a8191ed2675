"""``python -m xmx.data check <root> [--json] [--datasets a,b]``: the dataset checker.
``python -m xmx.data fake <root> [--datasets a,b] [--size 8]``: a small fake CoOp-layout tree to try the real-data
path without the data.
``python -m xmx.data get <dataset ...|all> --root <root>``: download the datasets into CoOp's layout, verified."""

from __future__ import annotations

import sys

USAGE = ("usage: python -m xmx.data check <root> [--json] [--datasets name,...]\n"
         "       python -m xmx.data fake <root> [--datasets name,...] [--size 8]\n"
         "       python -m xmx.data get <dataset ...|all> --root <root> [--from <ILSVRC2012 folder>]")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("check", "fake", "get"):
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "fake":
        from xmx.data.fake import main as fake_main
        return fake_main(argv[1:])
    if argv[0] == "get":
        from xmx.data.get import main as get_main
        return get_main(argv[1:])
    from xmx.data.check import main as check_main
    return check_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
