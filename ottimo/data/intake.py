"""Guards every data file passes before it is read, and the quarantine a rejected file goes to.

The checks here look at a file without loading it: where it really lives (no symlink out of the project),
its size, its row count (Parquet footer, or a streamed CSV line count), UTF-8 text and a CSV header without
duplicate names. Training data and scoring batches use the same guards and the same quarantine.
"""

from __future__ import annotations

import codecs
import csv
import math
import shutil
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ottimo.config import LimitsCfg

MB = 1 << 20
CHUNK = 1 << 20


class DataValidationError(ValueError):
    """A data file breaks the schema; the message names the columns and rows."""


class OutsideProjectError(DataValidationError):
    """A path resolves outside the project folder (`..`, an absolute path or a symlink out of it)."""


def inside(root: Path, path: Path, what: str = "data file") -> Path:
    """`path` with symlinks resolved; raise OutsideProjectError unless it lies inside `root`."""
    real, base = path.resolve(), root.resolve()
    if not real.is_relative_to(base):
        raise OutsideProjectError(
            f"{path}: the {what} resolves to {real}, outside the project {base}; it was not read. "
            "Copy the file into the project (e.g. data/raw/) and point the config there.")
    return real


def npz_arrays(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of every array in an .npz file, from the .npy headers alone (nothing is loaded)."""
    try:
        with zipfile.ZipFile(path) as z:
            out = {}
            for member in z.namelist():
                with z.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                out[member.removesuffix(".npy")] = (tuple(shape), dtype)
            return out
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise DataValidationError(f"{path}: not a complete .npz file (numpy.savez), truncated or corrupt ({err}); "
                                  "write it again with numpy.savez(path, X=..., y=...)") from None


def check_npz(path: Path, limits: LimitsCfg) -> int:
    """An .npz holds numbers only (no object arrays: they would need pickle) and X decodes within
    limits.max_file_mb; returns its rows (X's first axis)."""
    arrays = npz_arrays(path)
    if "X" not in arrays:
        raise DataValidationError(f"{path}: no array X in the .npz (it has {sorted(arrays)}); save the rows as X "
                                  "(N, C, H, W) or (N, L) and the labels as y")
    for name, (_, dtype) in arrays.items():
        if dtype.hasobject or dtype.kind not in "biuf":
            raise DataValidationError(f"{path}: array {name!r} is {dtype}; an .npz batch or data file holds "
                                      "numbers only (objects would need pickle, which is never loaded)")
    decoded = sum(math.prod(shape) * dtype.itemsize for shape, dtype in arrays.values())
    shape = arrays["X"][0]
    if decoded > limits.max_file_mb * MB:
        raise DataValidationError(
            f"{path}: X {list(shape)} (and the other arrays) decodes to {decoded / MB:,.1f} MB, above "
            f"limits.max_file_mb = {limits.max_file_mb:g}; it was not read. Split it into smaller files or raise "
            "limits.max_file_mb")
    return shape[0] if shape else 0


def count_rows(path: Path) -> int:
    """Rows without reading the data: the Parquet footer, or newlines counted chunk by chunk (minus the header)."""
    if path.suffix.lower() == ".npz":
        shape = npz_arrays(path).get("X", ((0,), None))[0]
        return shape[0] if shape else 0
    if path.suffix.lower() == ".parquet":
        try:
            return pq.read_metadata(path).num_rows
        except Exception as err:  # pyarrow: ArrowInvalid, OSError ... for a cut or foreign file
            raise DataValidationError(
                f"{path}: not a complete Parquet file, truncated or corrupt ({err}); copy or export it again"
            ) from None
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return max(lines + (last != b"\n") - 1, 0)


def check_utf8(path: Path) -> None:
    """Decode the file as UTF-8 chunk by chunk; name the first bad byte and its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                where = offset + max(err.start, 0)
                raise DataValidationError(
                    f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {where}); "
                    "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if not chunk:
                return
            offset += len(chunk)


def check_csv_header(path: Path) -> None:
    """Duplicate names in a CSV header (pandas would silently rename the second one to `name.1`)."""
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    seen, dupes = set(), []
    for name in header:
        if name in seen and name not in dupes:
            dupes.append(name)
        seen.add(name)
    if dupes:
        raise DataValidationError(f"{path}: duplicate column names {sorted(dupes)}; every column needs its own name")


def preflight(root: Path, path: Path, limits: LimitsCfg) -> None:
    """Every check that needs no parsing, cheapest first; raise DataValidationError naming the problem."""
    inside(root, path)
    if not path.exists():
        raise DataValidationError(f"{path}: file not found")
    if not path.is_file():
        raise DataValidationError(f"{path}: not a regular file; point data.path at a CSV, Parquet or .npz file")
    size = path.stat().st_size
    if size == 0:
        raise DataValidationError(f"{path}: the file is empty (0 bytes); write the data (with a header row) again")
    if size > limits.max_file_mb * MB:
        raise DataValidationError(
            f"{path}: {size / MB:,.1f} MB is above limits.max_file_mb = {limits.max_file_mb:g}; it was not read. "
            "Split it into smaller files or raise limits.max_file_mb in params.yaml")
    if path.suffix.lower() == ".npz":
        check_npz(path, limits)
    elif path.suffix.lower() != ".parquet":
        check_utf8(path)
        check_csv_header(path)
    rows = count_rows(path)
    if rows > limits.max_rows:
        raise DataValidationError(
            f"{path}: {rows:,} rows is above limits.max_rows = {limits.max_rows:,}; it was not read. "
            "Split it into smaller files or raise limits.max_rows in params.yaml")


def quarantine(root: Path, path: Path, reason: str, limits: LimitsCfg, move: bool = False) -> tuple[Path | None, Path]:
    """Keep a rejected file under `limits.quarantine_dir` as `<name>.<UTC time>` with `<...>.reason.txt`.

    `move` (incoming batches) renames it there (a symlink out of the project: the link, not its target, so it
    is not picked up again); otherwise (the user's training file) a copy is made and the
    original stays. No copy is made of a file outside the project or above `max_file_mb`: the note says where
    it is. Returns (the kept file or None, the reason file).
    """
    folder = root / limits.quarantine_dir
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    dst = folder / f"{path.name}.{stamp}"
    try:
        inside(root, path)
        ok = path.is_file() and (move or path.stat().st_size <= limits.max_file_mb * MB)
    except OutsideProjectError:
        ok = False
    if move and not ok and path.is_symlink():  # an incoming link out of the project: the link moves, not its target
        path.rename(dst)
        dst, action = None, f"the link {path} moved here as {dst.name}; its target was not read or touched"
    elif ok and move:
        shutil.move(path, dst)
        action = f"moved here from {path}"
    elif ok:
        shutil.copy2(path, dst)
        action = f"copied here; the original {path} is left as it was"
    else:
        dst, action = None, f"not copied (outside the project, too big or missing); the original is at {path}"
    note = folder / f"{path.name}.{stamp}.reason.txt"
    note.write_text(f"file: {path}\nwhen: {stamp}\naction: {action}\nreason:\n{reason}\n")
    return dst, note
