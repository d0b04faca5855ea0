"""A checkpoint's manifest: every file it holds, with its size and SHA-256.

Written last, when every rank has written its files, and checked before anything of the
checkpoint is loaded: bytes flipped on the disk, a file cut short, replaced, added or removed
make the checkpoint refused by name, instead of a resume that silently goes another way. The
ranks share the hashing (each takes every world-size-th file): a checkpoint is read and
written once in all, whatever the number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .. import dist

NAME = "manifest.json"
VERSION = 1


def _files(folder: Path) -> list[str]:
    """The checkpoint's entries other than the manifest, as sorted '/'-paths; a link (to a file
    or a folder) is listed as such and never followed."""
    out = []
    for here, dirs, files in os.walk(folder):
        rel = Path(here).relative_to(folder)
        out += [(rel / d).as_posix() for d in dirs if os.path.islink(os.path.join(here, d))]
        out += [(rel / f).as_posix() for f in files]
    return sorted(p for p in out if p != NAME)


def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _shared(fn, items: list[str]) -> list:
    """`fn(item)` for every item, the ranks taking every world-size-th one; every rank gets all
    results, in the order of `items`."""
    world, r = dist.world_size(), dist.rank()
    mine = {i: fn(items[i]) for i in range(r, len(items), world)}
    parts = dist.all_gather_objects(mine) if world > 1 else [mine]
    merged = {i: v for part in parts for i, v in part.items()}
    return [merged[i] for i in range(len(items))]


def write_manifest(folder: Path) -> None:
    """Hash every file of `folder` (every rank calls this) and write the manifest (rank 0)."""
    names = _files(folder)
    digests = _shared(lambda n: _digest(folder / n), names)
    if dist.is_main():
        body = {"version": VERSION, "files": dict(zip(names, digests, strict=True))}
        with (folder / NAME).open("x", encoding="utf-8") as fh:
            json.dump(body, fh, indent=1)


def problem(folder: Path) -> str | None:
    """What is wrong with the checkpoint `folder` against its manifest (None: nothing; every
    rank calls this and gets the same answer). A checkpoint without a manifest is reported as
    such ('no manifest')."""
    path = folder / NAME
    if path.is_symlink() or not path.is_file():
        return f"no {NAME}"
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))["files"]
        listed = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{NAME} cannot be read ({type(exc).__name__}: {exc})"
    present = _files(folder)
    extra = sorted(set(present) - set(listed))
    if extra:
        return f"{extra[0]} is not in {NAME} (added after the checkpoint was written)"
    missing = sorted(set(listed) - set(present))
    if missing:
        return f"{missing[0]} is missing"
    names = sorted(listed)
    found = _shared(lambda n: _check(folder, n, *listed[n]), names)
    return next((p for p in found if p is not None), None)


def _check(folder: Path, name: str, size: int, sha256: str) -> str | None:
    path = folder / name
    if path.is_symlink() or not path.is_file():
        return f"{name} is not a plain file"
    try:
        got = _digest(path)
    except OSError as exc:
        return f"{name} cannot be read ({exc.strerror or exc})"
    if got["bytes"] != size:
        return f"{name} has {got['bytes']} bytes, {size} when it was written"
    if got["sha256"] != sha256:
        return f"{name} is not what was written (its SHA-256 differs)"
    return None
