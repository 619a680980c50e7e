"""Bounded-memory tensor reading and writing for the converter.

Readers give each tensor's shape and dtype from the file header alone and read ONE tensor's bytes with plain file
reads into fresh memory (no memory map stays open over the whole file, so a 28 GB checkpoint never counts towards
the process's resident memory): `*.safetensors` by their JSON header, `*.pth` / `*.pt` / `*.bin` zip archives by
unpickling `data.pkl` with only tensor-rebuilding globals allowed (like `weights_only=True`) and reading each
storage record at its offset.

`write_safetensors_shards` writes planned tensors into `*.safetensors` shards header first, then streams every
tensor in, so the peak memory of a conversion is the largest single tensor plus a constant, whatever the shard or
model size.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import re
import struct
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a file and what they are."""

    file: Path
    offset: int  # byte offset of the storage in the file
    nbytes: int  # bytes to read (the whole storage)
    dtype: torch.dtype
    shape: tuple[int, ...]
    storage_offset: int = 0  # in elements, into the storage read
    stride: tuple[int, ...] | None = None  # None: contiguous


def _read_bytes(file: Path, offset: int, nbytes: int) -> torch.Tensor:
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    with open(file, "rb") as handle:
        handle.seek(offset)
        view = memoryview(buffer.numpy()).cast("B")
        got = handle.readinto(view)
        if hasattr(os, "posix_fadvise"):  # the page cache need not keep what was converted
            os.posix_fadvise(handle.fileno(), offset, nbytes, os.POSIX_FADV_DONTNEED)
    if got != nbytes:
        raise ValueError(f"{file} is truncated: wanted {nbytes} bytes at offset {offset}, got {got}")
    return buffer


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into fresh (not file-backed) memory."""
    raw = _read_bytes(info.file, info.offset, info.nbytes)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    flat = raw.view(info.dtype)
    if info.stride is None:
        return flat[info.storage_offset : info.storage_offset + math.prod(info.shape)].view(info.shape)
    return flat.as_strided(info.shape, info.stride, info.storage_offset).clone()


def safetensors_index(file: Path) -> dict[str, TensorInfo]:
    """Tensor table of a `.safetensors` file from its header (nothing else read)."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than its header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ValueError(f"{file} is truncated or not a safetensors file (header of {header_len} bytes)")
        header = json.loads(handle.read(header_len))
    base, table = 8 + header_len, {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        if base + end > size:
            raise ValueError(f"{file} is truncated: tensor {key!r} ends at byte {base + end}, the file has {size}")
        table[key] = TensorInfo(
            file, base + start, end - start, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
        )
    return table


class _RecordsUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint's `data.pkl` into `TensorInfo`s; only the globals a state dict of tensors
    needs are allowed (what `weights_only=True` allows for such files)."""

    def __init__(self, data: bytes, file: Path, reader):
        import io

        super().__init__(io.BytesIO(data))
        self._file, self._reader = file, reader
        self._prefix = next(n for n in reader.get_all_records() if n.endswith("data.pkl"))[: -len("data.pkl")]

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return self._rebuild
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, hooks: data
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        if module == "torch" and name in ("float32", "bfloat16", "float16", "int64"):  # new-style dtype globals
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{self._file}: global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid):
        _, storage_type, key, _location, numel = pid
        with warnings.catch_warnings():  # legacy typed-storage classes warn on `.dtype`
            warnings.simplefilter("ignore")
            dtype = storage_type if isinstance(storage_type, torch.dtype) else storage_type.dtype
        record = f"{self._prefix}data/{key}"
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        return TensorInfo(self._file, self._reader.get_record_offset(record), nbytes, dtype, ())

    @staticmethod
    def _rebuild(storage: TensorInfo, storage_offset, size, stride, *args) -> TensorInfo:
        size, stride = tuple(size), tuple(stride)
        contiguous = stride == tuple(math.prod(size[i + 1 :]) for i in range(len(size)))
        return TensorInfo(
            storage.file,
            storage.offset,
            storage.nbytes,
            storage.dtype,
            size,
            storage_offset,
            None if contiguous else stride,
        )


def pth_index(file: Path) -> dict[str, TensorInfo]:
    """Tensor table of a torch zip checkpoint (`torch.save` format) without loading any tensor."""
    try:
        reader = torch._C.PyTorchFileReader(str(file))
    except RuntimeError as error:
        raise ValueError(f"{file} is not a readable torch zip checkpoint: {error}") from None
    pkl = next((n for n in reader.get_all_records() if n.endswith("data.pkl")), None)
    if pkl is None:
        raise ValueError(f"{file} has no data.pkl: not a torch checkpoint")
    state = _RecordsUnpickler(reader.get_record(pkl), file, reader).load()
    for nested in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(nested), dict) and len(state) == 1:
            state = state[nested]
    if not isinstance(state, dict) or not all(isinstance(v, TensorInfo) for v in state.values()):
        raise ValueError(f"{file} does not hold a flat dict of tensors")
    size = file.stat().st_size
    for key, info in state.items():
        if info.offset + info.nbytes > size:
            raise ValueError(f"{file} is truncated: tensor {key!r} ends past the end of the file")
    return dict(state)


def file_index(file: Path) -> dict[str, TensorInfo]:
    return safetensors_index(file) if file.suffix == ".safetensors" else pth_index(file)


class TensorSource:
    """Lazy view over one or more weight files (a folder's `*.safetensors`, else its `*.pth`; or explicit files):
    keys, shapes and dtypes from headers, one tensor read at a time."""

    def __init__(self, where: str | os.PathLike | Iterable[str | os.PathLike]):
        files = self._files(where)
        self.files = files
        self._index: dict[str, TensorInfo] = {}
        for file in files:
            for key, info in file_index(file).items():
                if key in self._index:
                    raise ValueError(
                        f"Key {key!r} appears in more than one weight file ({self._index[key].file}, {file})"
                    )
                self._index[key] = info

    @staticmethod
    def _files(where) -> list[Path]:
        if isinstance(where, (str, os.PathLike)) and Path(where).is_dir():
            folder = Path(where)
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                files = sorted([*folder.glob("*.pth"), *folder.glob("*.pt"), *folder.glob("*.bin")])
            if not files:
                raise FileNotFoundError(f"No *.safetensors (or *.pth) weight files in {folder}")
            return files
        files = [Path(where)] if isinstance(where, (str, os.PathLike)) else [Path(f) for f in where]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"weight file not found: {file}")
        return files

    def keys(self) -> list[str]:
        return sorted(self._index)

    def info(self, key: str) -> TensorInfo:
        return self._index[key]

    def get(self, key: str) -> torch.Tensor:
        return read_tensor(self._index[key])

    def total_bytes(self) -> int:
        return sum(math.prod(i.shape) * i.dtype.itemsize for i in self._index.values())


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, final shape and dtype, and how to produce it (called when it is written)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)\s*", size.upper())
    if not match:
        raise ValueError(f"Cannot parse shard size {size!r} (e.g. '5GB')")
    return int(float(match.group(1)) * units[match.group(2)])


def _write_one_shard(path: Path, tensors: list[PlannedTensor], progress) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for item in tensors:
        header[item.name] = {
            "dtype": _DTYPE_NAMES[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for item in tensors:
            tensor = item.produce()
            if tuple(tensor.shape) != item.shape:
                raise ValueError(f"{item.name}: planned shape {item.shape}, produced {tuple(tensor.shape)}")
            tensor = tensor.to(item.dtype).contiguous()
            handle.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            progress(item.nbytes)
            del tensor


def write_safetensors_shards(
    folder: Path,
    tensors: list[PlannedTensor],
    weights_name: str,
    max_shard_size: int | str = "5GB",
    description: str | None = None,
) -> dict:
    """Write `tensors` (in order) into `weights_name.safetensors` or `weights_name-0000i-of-0000n.safetensors` shards
    of at most `max_shard_size` (+ `weights_name.safetensors.index.json`), the diffusers/transformers layout.
    Shows a progress bar (bytes) labelled `description`. Returns the index written (or would be, for one shard)."""
    from tqdm.auto import tqdm

    limit = parse_size(max_shard_size)
    shards: list[list[PlannedTensor]] = [[]]
    shard_bytes = 0
    for item in tensors:
        if shards[-1] and shard_bytes + item.nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(item)
        shard_bytes += item.nbytes
    total = sum(item.nbytes for item in tensors)
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=description or weights_name, leave=False) as bar:
        for index, shard in enumerate(shards, start=1):
            name = (
                f"{weights_name}.safetensors"
                if len(shards) == 1
                else (f"{weights_name}-{index:05d}-of-{len(shards):05d}.safetensors")
            )
            _write_one_shard(folder / name, shard, bar.update)
            weight_map.update({item.name: name for item in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if len(shards) > 1:
        (folder / f"{weights_name}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return index
