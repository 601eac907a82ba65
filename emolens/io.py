"""Atomic file writes: a reader never sees a half-written file, a crash never leaves one behind.

Every writer goes through :func:`atomic_path`: it yields a temporary path in the target's folder,
the caller writes there, and on success the file is fsynced and renamed over the target (and the
folder fsynced so the rename survives a power loss). On error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputPathError

__all__ = ["atomic_path", "ensure_dir", "publish", "safetensors_bytes", "write_bytes", "write_text", "write_json", "write_parquet", "write_safetensors"]


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse fsync on a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _why(target: Path, e: OSError) -> str:
    """Say which part of ``target``'s path is in the way."""
    for parent in [target.parent, *target.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{parent} is not writable"
            break
    return e.strerror or str(e)


def ensure_dir(folder: str | Path) -> Path:
    """``mkdir -p folder`` with an :class:`~emolens.errors.OutputPathError` that names what is in the way."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"Cannot create the folder {folder}: {_why(folder / '_', e)}; choose an output path in "
                              "a writable folder.") from None
    return folder


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it over ``target`` when the block succeeds."""
    target = Path(target)
    if target.is_dir():
        raise OutputPathError(f"Cannot write {target}: it is a folder; pass a file path.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise OutputPathError(f"Cannot write {target}: {_why(target, e)}; choose an output path in a writable "
                              "folder (e.g. under your home or the current directory).") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` leaves when its process is killed mid-write.

    They are named ``.<target>.<random>.tmp`` next to their target; a killed writer never renamed them, so
    they are never outputs. Call it only on a folder no other process is writing to (a run being resumed).
    """
    gone = []
    for p in sorted(Path(folder).rglob(".*.tmp")):
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def publish(src: str | Path, target: str | Path) -> Path:
    """Move a finished file ``src`` over ``target`` atomically (fsync the file, rename, fsync the folder).

    ``src`` must be on the same file system (e.g. a staging folder next to the target).
    """
    src, target = Path(src), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(src, target)
    _fsync_dir(target.parent)
    return target


def write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, obj: Any, *, indent: int | None = 1, default=str) -> Path:
    return write_text(target, json.dumps(obj, indent=indent, default=default))


def write_parquet(target: str | Path, df) -> Path:
    """Write a pandas DataFrame as parquet (no index)."""
    with atomic_path(target) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(target)


_ST_DTYPES = {torch_name: st for torch_name, st in (
    ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("int64", "I64"),
    ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"))}


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors encoding of ``{name: tensor}``, byte-deterministic.

    The reference writer keeps metadata in a hash map whose order changes from process to process,
    so two runs that computed the same tensors wrote different bytes. Here the header is JSON with
    sorted keys and tensors are laid out in name order (a valid file for every safetensors reader).
    """
    import torch

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dtype = _ST_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise TypeError(f"safetensors cannot store {t.dtype} (tensor {name!r}); convert it first.")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def write_safetensors(target: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write ``{name: tensor}`` with string metadata as safetensors, atomically and byte-deterministically."""
    return write_bytes(target, safetensors_bytes(tensors, metadata))
