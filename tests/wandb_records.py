"""Read an offline W&B run file (run-<id>.wandb) back: LevelDB-style log of protobuf ``Record`` s.

File layout: a 7-byte header (b":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each with a
7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last).
"""

import json
import struct

BLOCK = 32768


def records(path):
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""


def history(path) -> dict[str, list]:
    """key -> list of logged values (JSON-decoded), in order."""
    out: dict[str, list] = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                out.setdefault(key, []).append(json.loads(item.value_json))
    return out


def history_rows(path) -> list[dict]:
    """One dict per history record (key -> JSON-decoded value), in order: what was logged together."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows


def summary(path) -> dict:
    """The run summary as last written (key -> JSON-decoded value; later records update earlier ones)."""
    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def config(path) -> dict:
    """The run config (top-level key -> JSON-decoded value) from every config record."""
    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "config":
            for item in rec.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
