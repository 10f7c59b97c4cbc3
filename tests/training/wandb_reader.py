"""Reads an offline wandb run (`run-<id>.wandb`) back: config, history, summary (for the tests
that check what a run sent to wandb).

wandb 0.31 ships no public reader. The file is a LevelDB-style log: a 7-byte header
(":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
(CRC-32 of type byte + payload, uint16 length, uint8 type: 1 full, 2 first, 3 middle, 4 last);
a block tail shorter than a chunk header is zero padding. Each reassembled record is a
`wandb.proto.wandb_internal_pb2.Record`. Written by hand because nothing in wandb exposes it.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["WandbRun", "find_run_file", "iter_records", "read_offline_run"]

_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_CHUNK = struct.Struct("<IHB")  # crc32, length, type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yields every `Record` protobuf in a .wandb file, in order. Raises ValueError on a bad
    header or checksum; stops quietly at a truncated tail (a run still being written)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < _HEADER.size:
        raise ValueError(f"path: {path} is too short to be a .wandb file")
    ident, magic, version = _HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"path: {path} has no wandb log header (got {ident!r}, {magic:#x})")
    off, pending = _HEADER.size, b""
    while off < len(data):
        left = _BLOCK - off % _BLOCK
        if left < _CHUNK.size:  # block trailer padding
            off += left
            continue
        if off + _CHUNK.size > len(data):
            return
        crc, length, kind = _CHUNK.unpack_from(data, off)
        if kind == 0 and length == 0 and crc == 0:  # zero-filled rest of the file
            return
        payload = data[off + _CHUNK.size : off + _CHUNK.size + length]
        if len(payload) < length:
            return
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"path: {path} has a bad checksum at byte {off}")
        off += _CHUNK.size + length
        if kind == _FULL:
            chunk = payload
        elif kind == _FIRST:
            pending = payload
            continue
        elif kind == _MIDDLE:
            pending += payload
            continue
        elif kind == _LAST:
            chunk, pending = pending + payload, b""
        else:
            raise ValueError(f"path: {path} has an unknown chunk type {kind} at byte {off}")
        record = pb.Record()
        record.ParseFromString(chunk)
        yield record


def _put(target: dict[str, Any], item: Any) -> None:
    """Stores a history/summary/config item (key or nested_key path) with its JSON value."""
    value = json.loads(item.value_json)
    keys = [item.key] if item.key else list(item.nested_key)
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value


@dataclass
class WandbRun:
    """What an offline run holds. history: one dict per logged step (with "_step"); histograms
    read back as {"_type": "histogram", "values": counts, "bins": edges}; alerts: one
    {"title", "text", "level"} per `run.alert` call, in order."""

    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    alerts: list[dict[str, str]] = field(default_factory=list)
    finished: bool = False  # the run's exit record was found

    def series(self, key: str) -> dict[int, Any]:
        """step -> value of `key` over the history rows that hold it."""
        return {int(h["_step"]): h[key] for h in self.history if key in h}


def read_offline_run(path: str | Path, *, wait_s: float = 30.0) -> WandbRun:
    """Reads a `.wandb` file, an `offline-run-*` directory, or a WANDB_DIR (latest run).

    `run.finish()` returns before wandb's service process has written the file out, so this
    re-reads for up to `wait_s` seconds until the run's exit record is there (`finished`);
    wait_s=0 reads what is there now (a live run).
    """
    if wait_s < 0:
        raise ValueError(f"wait_s must be >= 0 (seconds), got {wait_s}")
    file = find_run_file(path)
    deadline = time.monotonic() + wait_s
    while True:
        run = _read_once(file)
        if run.finished or time.monotonic() >= deadline:
            return run
        time.sleep(0.1)


def _read_once(file: Path) -> WandbRun:
    run = WandbRun()
    for rec in iter_records(file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id, run.project = r.run_id, r.project
            run.name, run.group, run.tags = r.display_name, r.run_group, list(r.tags)
            for item in r.config.update:
                _put(run.config, item)
        elif kind == "config":
            for item in rec.config.update:
                _put(run.config, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _put(row, item)
            run.history.append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _put(run.summary, item)
        elif kind == "alert":
            a = rec.alert
            run.alerts.append({"title": a.title, "text": a.text, "level": a.level})
        elif kind == "exit":
            run.finished = True
    run.config.pop("_wandb", None)
    return run


def find_run_file(path: str | Path) -> Path:
    """The .wandb file at `path`: the file itself, the one in a run directory, or the newest
    offline run under a WANDB_DIR (looked for in `path` and `path/wandb`)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ValueError(f"path: {p} is neither a .wandb file nor a directory")
    direct = sorted(p.glob("run-*.wandb"))
    if direct:
        return direct[-1]
    runs = sorted(p.glob("offline-run-*/run-*.wandb")) + sorted(
        p.glob("wandb/offline-run-*/run-*.wandb")
    )
    if not runs:
        raise ValueError(f"path: no offline wandb run found under {p}")
    return max(runs, key=lambda f: (f.parent.name, f.stat().st_mtime))
