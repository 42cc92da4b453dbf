"""Command line: `python -m fastvideo_offload bench [options]`."""

import logging
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "bench":
        print("usage: python -m fastvideo_offload bench [--help]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .bench import main as bench

    bench(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
