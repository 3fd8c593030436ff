"""Manifests: the files of a folder with their sizes and checksums, written last and atomically,
so that a complete folder can be told from a damaged one without loading anything.

``manifest.json`` in a checkpoint (or in ``final-model``)::

    {"format": 1, "checksum": "crc32",
     "files": {"policy.safetensors": {"size": 2167384, "crc32": "9a0c41f2"}, ...}}

The checksum is CRC-32 (``zlib.crc32``, about 2.5 GB/s on one core): it catches every
truncation, every flipped bit and every burst of damage up to 32 bits, which is what a
crash, a disk or a copy cut short does to a file; it is not a defence against someone who
edits a file on purpose. ``write`` writes ``.manifest.json.tmp``, fsyncs it and renames it
to ``manifest.json``, so the manifest is either complete or absent.

    write(folder)                    -> bytes of the files it lists
    problems(folder, checksums=True) -> what is wrong, one sentence each (empty when complete)

Nothing here imports torch: ``hpt-dsl runs verify`` checks a run folder in the time it
takes to read it.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 4 << 20


def crc32(path: Path) -> str:
    """CRC-32 of the file's bytes, 8 hex digits."""
    value = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            value = zlib.crc32(block, value)
    return f"{value:08x}"


def _listed(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, f".{MANIFEST}.tmp"))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(folder: Path) -> int:
    """Write ``folder/manifest.json`` for every other file under ``folder`` (atomically, fsynced);
    returns their total size in bytes."""
    files: dict[str, dict[str, Any]] = {}
    for p in _listed(folder):
        files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "crc32": crc32(p)}
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "checksum": "crc32", "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    fsync_dir(folder)
    return sum(int(v["size"]) for v in files.values())


def read(folder: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` table; raises ``ValueError`` saying what is wrong with it."""
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no {MANIFEST} (its write did not finish)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{MANIFEST} is damaged ({e})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{MANIFEST} is damaged (not a format {FORMAT} manifest)")
    return files


def size(folder: Path) -> int | None:
    """Bytes of the files the manifest lists, or None without a readable manifest."""
    try:
        return sum(int(v.get("size", 0)) for v in read(folder).values())
    except (ValueError, TypeError, AttributeError):
        return None


def problems(folder: Path, checksums: bool = True) -> list[str]:
    """What is wrong with ``folder`` against its manifest: a missing or damaged manifest, a
    missing file, a file of the wrong size (cut short), a file whose checksum differs (its
    bytes changed). Sizes only with ``checksums=False`` (a stat per file)."""
    try:
        files = read(folder)
    except ValueError as e:
        return [str(e)]
    found = []
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            found.append(f"{name} is missing")
            continue
        want, have = int(entry.get("size", -1)), path.stat().st_size
        if have != want:
            how = "cut short" if have < want else "longer than written"
            found.append(f"{name} is {have} bytes, the manifest says {want} ({how})")
        elif checksums and crc32(path) != entry.get("crc32"):
            found.append(f"{name} does not match its checksum (its bytes changed)")
    return found
