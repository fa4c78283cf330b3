"""Where calibration activations live between blocks: CPU memory, or safetensors shards on disk."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save

__all__ = ["ActivationStore"]


class ActivationStore:
    """An append-only list of (b, T, d) batches. With `spill_dir` each batch is a file
    (batch_00000.safetensors) and only the batch being used is in memory; the sha256 of every file
    it writes is taken from the bytes on their way to disk (file_digests), so whoever indexes the
    files need not read them back."""

    def __init__(self, spill_dir: str | os.PathLike | None = None) -> None:
        self._mem: list[torch.Tensor] = []
        self._dir = Path(spill_dir) if spill_dir is not None else None
        self._n = 0
        self._digests: list[str] = []
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_batches(cls, batches: list[torch.Tensor], spill_dir=None) -> "ActivationStore":
        store = cls(spill_dir)
        for b in batches:
            store.append(b)
        return store

    @classmethod
    def open(cls, spill_dir: str | os.PathLike) -> "ActivationStore":
        """A store over batch files already in spill_dir (batch_00000.safetensors, ...)."""
        store = cls(spill_dir)
        store._n = len(list(Path(spill_dir).glob("batch_*.safetensors")))
        return store

    def files(self) -> list[Path]:
        if self._dir is None:
            raise ValueError("an in-memory store has no files")
        return [self._path(i) for i in range(self._n)]

    def file_digests(self) -> list[str] | None:
        """sha256 (hex) of each batch file, in order, if this store wrote all of them; else None."""
        return list(self._digests) if self._dir is not None and len(self._digests) == self._n else None

    def in_memory(self) -> "ActivationStore":
        return self if self._dir is None else ActivationStore.from_batches(list(self))

    def _path(self, i: int) -> Path:
        return self._dir / f"batch_{i:05d}.safetensors"

    def append(self, x: torch.Tensor) -> None:
        x = x.detach().to("cpu").contiguous()
        if self._dir is None:
            self._mem.append(x)
        else:
            data = save({"x": x})  # the file's bytes: hashed here, written once
            fd, tmp = tempfile.mkstemp(dir=self._dir, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self._path(self._n))
            except OSError as e:  # a full or read-only disk: no temporary left, the error names the file
                Path(tmp).unlink(missing_ok=True)
                raise OSError(e.errno, e.strerror, str(self._path(self._n))) from e
            self._digests.append(hashlib.sha256(data).hexdigest())
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._mem[i] if self._dir is None else load_file(str(self._path(i)))["x"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(self._n))

    def cat(self) -> torch.Tensor:
        return torch.cat(list(self), dim=0)
