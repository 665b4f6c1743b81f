"""The interface of an output format: turn a table of output rows into one shard's bytes, and
publish it whole under a name (a temporary name then a rename, or one PUT: storage.write_bytes),
so a listed shard is always complete."""

from __future__ import annotations

from abc import ABC, abstractmethod

import pyarrow as pa

from pipeline import storage
from pipeline.spec import StorageSpec


class FormatWriter(ABC):
    suffix: str  # the shard file's extension, with its dot

    @abstractmethod
    def encode(self, table: pa.Table) -> bytes:
        """One shard's bytes holding every row of ``table``."""

    def publish(self, uri: str, table: pa.Table, storage_spec: StorageSpec) -> None:
        storage.write_bytes(uri, self.encode(table), storage_spec)
