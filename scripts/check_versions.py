"""Print the installed versions of diffblend's dependencies; fail if one leaves the tested range.

The tested range of a package is [its version in requirements/floor.txt, its version in
requirements/lock.txt] (a bound missing from a file is open), within what pyproject.toml declares.
CI runs it after installing with the lock, so a dependency that drifts stops CI with its name.

    python scripts/check_versions.py
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins(path: Path) -> dict[str, Version]:
    """``{canonical name: version}`` of the ``name==version`` lines of a requirements file."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            out[canonicalize_name(m.group(1))] = Version(m.group(2))
    return out


def main() -> int:
    floor, lock = pins(ROOT / "requirements/floor.txt"), pins(ROOT / "requirements/lock.txt")
    bad = []
    print(f"{'package':24} {'installed':>12} {'floor':>10} {'lock':>10}  declared")
    for text in metadata.requires("diffblend") or []:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        try:
            have = Version(metadata.version(req.name))
        except metadata.PackageNotFoundError:
            continue  # an extra that is not installed
        lo, hi = floor.get(name), lock.get(name)
        ok = have in req.specifier and (lo is None or have >= lo) and (hi is None or have.release <= hi.release)
        print(f"{name:24} {str(have):>12} {str(lo or '-'):>10} {str(hi or '-'):>10}  {req.specifier or '-'}"
              f"{'' if ok else '   <- outside the tested range'}")
        if not ok:
            bad.append(name)
    if bad:
        print(f"error: {', '.join(bad)} outside the tested range; install with -c requirements/lock.txt "
              f"(README) or re-make the lock (scripts/lock.sh)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
