"""Which pins have drifted: compare two sets of `name==version` lines (lock files or `pip freeze`).

    python scripts/lock_drift.py [--label TEXT] [--held-back pyproject.toml] LOCKED NEWER

Prints each package whose version differs (locked -> newer), then those only one side has.
--held-back: also asks the package index (`pip index versions`) for the newest release of every
direct requirement of the extras LOCKED was made for (its scripts/lock.sh header says which) and
names those that pyproject.toml's range keeps out. Always exits 0 when it could read its inputs:
drift is information (scripts/check_fresh_install.sh prints it).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare venv: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python < 3.11: no held-back report
    tomllib = None

PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)", re.M)


def pins(path: str) -> dict[str, str]:
    """name -> version; pip itself is never locked (`pip freeze --all` lists it)."""
    with open(path) as f:
        found = {canonicalize_name(m[1]): m[2] for m in PIN.finditer(f.read())}
    found.pop("pip", None)
    return found


def newest_release(name: str) -> str | None:
    r = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name, "--disable-pip-version-check"],
                       capture_output=True, text=True)
    m = re.match(r"\S+ \(([^)]+)\)", r.stdout)
    return m[1] if m else None


def held_back(pyproject: str, locked_path: str) -> list[str]:
    """Direct requirements whose newest release is outside pyproject.toml's range."""
    with open(locked_path) as f:
        command = re.search(r"^#\s+uv pip compile (.*)", f.read(), re.M)
    extras = re.findall(r"--extra (\S+)", command[1]) if command else []
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    lines, newest = [], {}
    for req in reqs:
        name = canonicalize_name(req.name)
        if not req.specifier:
            continue
        if name not in newest:
            newest[name] = newest_release(name)
        if newest[name] and not req.specifier.contains(newest[name], prereleases=True):
            lines.append(f"{name} {newest[name]} is out; pyproject.toml allows {req.specifier} ({req})")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("locked")
    ap.add_argument("newer")
    ap.add_argument("--label", default="newest releases")
    ap.add_argument("--held-back", metavar="PYPROJECT")
    a = ap.parse_args()
    old, new = pins(a.locked), pins(a.newer)
    changed = [f"{n}: {old[n]} -> {new[n]}" for n in sorted(old.keys() & new.keys()) if old[n] != new[n]]
    added = sorted(new.keys() - old.keys())
    gone = sorted(old.keys() - new.keys())
    print(f"{a.label} against {a.locked.rsplit('/', 1)[-1]}: {len(changed)} drifted, "
          f"{len(added)} new, {len(gone)} not there")
    for line in changed:
        print(f"  drifted  {line}")
    for n in added:
        print(f"  new      {n}=={new[n]}")
    for n in gone:
        print(f"  not there {n} (locked {old[n]})")
    if a.held_back and tomllib is not None:
        lines = held_back(a.held_back, a.locked)
        print(f"held back by pyproject.toml's ranges: {len(lines)}")
        for line in lines:
            print(f"  held back {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
