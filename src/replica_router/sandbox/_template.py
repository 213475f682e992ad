"""A fresh data directory in a fraction of initdb's time, with its own identity.

``initdb`` costs most of a sandbox's start-up (0.6 s idle, 2 s on a busy 2-core
machine). We run it once per machine and PostgreSQL version into a cached
template, and make each sandbox's primary by copying the template and giving the
copy a new *system identifier* - otherwise every sandbox would share one, and
tokens from one cluster would be accepted by another. The identifier lives in
``global/pg_control`` (first field, protected by a CRC32C) and in every WAL page
header, so we rewrite both (and pg_control's CRC). Every step checks what it
overwrites, and ``pg_controldata`` checks the result; on any doubt the caller
falls back to a plain initdb.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

from ..errors import SandboxError
from ._binaries import Binaries
from ._processes import RunAs, chown_tree, pid_alive, run

__all__ = ["clone_data_dir", "copy_template", "initdb", "template_dir"]

logger = logging.getLogger("replica_router.sandbox")

_RECIPE = "1"  # bump when the template's initdb arguments change
_CONTROL = Path("global") / "pg_control"
_MAX_CRC_OFFSET = 1024  # ControlFileData is ~300 bytes in every supported version
_XLP_SYSID = 24  # offsetof(XLogLongPageHeaderData, xlp_sysid)
_WAL_NAME = re.compile(r"[0-9A-F]{24}")


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def _crc32c_steps(data: bytes, limit: int) -> list[int]:
    """CRC32C of ``data[:k]`` for every k in 0..limit (PostgreSQL's pg_crc32c)."""
    crc, out = 0xFFFFFFFF, [0]
    for byte in data[:limit]:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        out.append(crc ^ 0xFFFFFFFF)
    return out


def _crc_offset(control: bytes) -> int:
    """Where pg_control's CRC field is: the CRC of everything before it is stored there."""
    steps = _crc32c_steps(control, min(len(control) - 4, _MAX_CRC_OFFSET))
    for offset in range(8, len(steps), 4):
        if int.from_bytes(control[offset : offset + 4], sys.byteorder) == steps[offset]:
            return offset
    raise SandboxError("pg_control has no recognisable CRC")


def new_system_identifier() -> int:
    """Like PostgreSQL's own: seconds, microseconds and the pid packed into 64 bits."""
    now = time.time_ns() // 1000
    seconds, micros = divmod(now, 1_000_000)
    return ((seconds << 32) | (micros << 12) | (os.getpid() & 0xFFF)) & 0xFFFFFFFFFFFFFFFF


def _set_system_identifier(data_dir: Path, identifier: int) -> None:
    path = data_dir / _CONTROL
    control = bytearray(path.read_bytes())
    offset = _crc_offset(bytes(control))
    control[0:8] = identifier.to_bytes(8, sys.byteorder)
    crc = _crc32c_steps(bytes(control), offset)[offset]
    control[offset : offset + 4] = crc.to_bytes(4, sys.byteorder)
    with path.open("r+b") as fh:
        fh.write(control)


def _controldata(binaries: Binaries, run_as: RunAs | None, data_dir: Path) -> dict[str, str]:
    out = run([binaries.path("pg_controldata"), str(data_dir)], run_as, cwd=data_dir.parent)
    return {
        key.strip(): value.strip()
        for key, _, value in (line.partition(":") for line in out.stdout.splitlines())
    }


def initdb(binaries: Binaries, run_as: RunAs | None, data_dir: Path, pwfile: Path | None) -> None:
    args = [binaries.path("initdb"), "-D", str(data_dir), "-U", "postgres", "-E", "UTF8"]
    args += ["--locale=C", "--no-sync", "-A", "trust"]
    if pwfile is not None:
        args.append(f"--pwfile={pwfile}")
    run(args, run_as, cwd=data_dir.parent)


def template_dir(root: Path, binaries: Binaries, run_as: RunAs | None) -> Path:
    """The cached initdb output for these binaries, made on first use (race-safe)."""
    initdb_path = Path(binaries.path("initdb"))
    stamp = f"{_RECIPE}|{binaries.bindir}|{initdb_path.stat().st_mtime_ns}|{run_as}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    final = root / f"template-pg{binaries.major}-{key}"
    if (final / "data" / "PG_VERSION").exists():
        return final / "data"
    for stale in root.glob(".building-*"):  # left by a process killed while building
        if not pid_alive(int(stale.name.rsplit("-", 1)[-1])):
            shutil.rmtree(stale, ignore_errors=True)
    building = root / f".building-{key}-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(mode=0o755)
    try:
        chown_tree(building, run_as)
        initdb(binaries, run_as, building / "data", pwfile=None)
        try:
            os.rename(building, final)
        except OSError:  # another process finished first: use theirs
            if not (final / "data" / "PG_VERSION").exists():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    logger.info("cached an initdb template in %s", final)
    return final / "data"


_CHUNK = 1 << 16
_ZEROS = bytes(_CHUNK)


def _copy_sparse(src: str, dst: str) -> None:
    """Copy a WAL segment without writing its zero-filled parts (most of the file)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            if chunk == _ZEROS[: len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
        fout.truncate()
    shutil.copystat(src, dst)


def clone_data_dir(source: Path, target: Path, run_as: RunAs | None) -> None:
    """Copy a stopped data directory; WAL segments are copied sparsely."""

    def copy(src: str, dst: str) -> None:
        if Path(src).parent.name == "pg_wal":
            _copy_sparse(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(
        source, target, symlinks=True, copy_function=copy, ignore=shutil.ignore_patterns("*.pid")
    )
    chown_tree(target, run_as)


def _set_wal_system_identifier(data_dir: Path, old: int, new: int) -> None:
    """Rewrite ``xlp_sysid`` in the long page header that starts each WAL segment.

    Only that header carries the identifier; record CRCs do not cover it.
    """
    segments = [p for p in (data_dir / "pg_wal").iterdir() if _WAL_NAME.fullmatch(p.name)]
    if not segments:
        raise SandboxError("the template has no WAL segment")
    for segment in segments:
        with segment.open("r+b") as fh:
            fh.seek(_XLP_SYSID)
            if int.from_bytes(fh.read(8), sys.byteorder) != old:
                raise SandboxError(f"unexpected WAL page header in {segment.name}")
            fh.seek(_XLP_SYSID)
            fh.write(new.to_bytes(8, sys.byteorder))


def copy_template(template: Path, target: Path, binaries: Binaries, run_as: RunAs | None) -> int:
    """Make ``target`` a copy of the template with a new system identifier; returns it."""
    old = int(_controldata(binaries, run_as, template)["Database system identifier"])
    clone_data_dir(template, target, run_as)
    identifier = new_system_identifier()
    _set_system_identifier(target, identifier)
    _set_wal_system_identifier(target, old, identifier)
    after = _controldata(binaries, run_as, target)
    if after.get("Database system identifier") != str(identifier):
        raise SandboxError(f"the copied template in {target} did not check out")
    return identifier
