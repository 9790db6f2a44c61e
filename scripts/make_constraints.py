"""Turn a Synapse release's ``poetry.lock`` into a pip constraints file.

Old Synapse releases need the dependency versions of their era: pip would otherwise
install today's releases of their dependencies, some of which break them (today's
``prometheus-client`` breaks the metrics module of Synapse 1.120 at import). The
versions Synapse's own CI tested a release with are those of ``poetry.lock`` at its git
tag, so each tested release gets one constraints file made from that lock::

    git -C synapse show v1.140.0:poetry.lock > /tmp/poetry.lock
    python scripts/make_constraints.py /tmp/poetry.lock --release 1.140.0 \\
        > constraints/synapse-1.140.0.txt

A constraints file only caps what gets installed, so listing Synapse's development
tools as well does no harm; ``matrix-synapse`` itself is pinned to the release.
"""

from __future__ import annotations

import argparse
import sys
import tomllib


def constraints(lock: dict, release: str, source: str) -> list[str]:
    lines = [
        f"# Synapse {release}: the versions of its poetry.lock ({source}),",
        "# made by scripts/make_constraints.py. Use: pip install -c <this file> ...",
        f"matrix-synapse=={release}",
    ]
    pins: dict[str, str] = {}
    for package in lock.get("package", []):
        if package.get("source", {}).get("type") in ("git", "directory", "file", "url"):
            continue  # not on PyPI: nothing pip could be constrained to
        name = package["name"].lower().replace("_", "-")
        pins[name] = package["version"]
    pins.pop("matrix-synapse", None)
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("lock", help="a poetry.lock file")
    parser.add_argument("--release", required=True, help="the Synapse release, e.g. 1.140.0")
    parser.add_argument("--source", default=None, help="where the lock came from (for the header)")
    args = parser.parse_args(argv)
    with open(args.lock, "rb") as f:
        lock = tomllib.load(f)
    source = args.source or f"element-hq/synapse v{args.release}"
    sys.stdout.write("\n".join(constraints(lock, args.release, source)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
