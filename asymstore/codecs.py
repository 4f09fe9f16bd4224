"""Codec chains for partitions, their zarr v3 metadata, and chunk encode/decode.

Every chain is expressible with codecs that both zarr-python and tensorstore read:
``bytes`` alone (raw), ``bytes`` + ``zstd``, or ``bytes`` + ``blosc`` (lz4 or zstd
inside, optional byte/bit shuffle). An exact delta is a partition stored as the XOR
of its bytes with the same bytes of a base checkpoint, then compressed; that transform
is recorded in the array's attributes (plain zarr readers XOR with the base themselves).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

import numcodecs
import numpy as np

from .errors import ConfigError, CorruptCheckpointError

Kind = Literal["raw", "zstd", "blosc"]
Shuffle = Literal["noshuffle", "shuffle", "bitshuffle"]
_SHUFFLE_CODE = {
    "noshuffle": numcodecs.Blosc.NOSHUFFLE,
    "shuffle": numcodecs.Blosc.SHUFFLE,
    "bitshuffle": numcodecs.Blosc.BITSHUFFLE,
}


@dataclass(frozen=True)
class CodecSpec:
    """One partition codec chain. ``delta`` marks XOR against a base checkpoint."""

    kind: Kind = "raw"
    level: int = 0
    cname: str = ""  # blosc inner compressor: "lz4" | "zstd"
    shuffle: Shuffle = "noshuffle"
    typesize: int = 1
    delta: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("raw", "zstd", "blosc"):
            raise ConfigError(f"unknown codec kind {self.kind!r}")
        if self.kind == "blosc" and self.cname not in ("lz4", "zstd", "lz4hc", "zlib", "blosclz"):
            raise ConfigError(f"unknown blosc compressor {self.cname!r}")
        if self.shuffle not in _SHUFFLE_CODE:
            raise ConfigError(f"unknown shuffle {self.shuffle!r}")
        if self.typesize not in (1, 2, 4, 8, 16):
            raise ConfigError(f"typesize must be 1, 2, 4, 8 or 16, got {self.typesize}")

    # --- naming and metadata ------------------------------------------------------
    @property
    def label(self) -> str:
        """Short human name, also the zarr array name of partitions using this chain."""
        if self.kind == "raw":
            base = "raw"
        elif self.kind == "zstd":
            base = f"zstd{self.level}"
        else:
            sh = {"noshuffle": "", "shuffle": "-shuf", "bitshuffle": "-bitshuf"}[self.shuffle]
            base = f"blosc-{self.cname}{self.level}{sh}" + (f"-t{self.typesize}" if self.shuffle != "noshuffle" else "")
        return ("xor-" + base) if self.delta else base

    @property
    def compresses(self) -> bool:
        """Whether the chain compresses (anything but raw)."""
        return self.kind != "raw"

    def zarr_chunk_codecs(self) -> list[dict[str, Any]]:
        """The zarr v3 codec list applied to each chunk (inside the sharding codec)."""
        codecs: list[dict[str, Any]] = [{"name": "bytes"}]
        if self.kind == "zstd":
            codecs.append({"name": "zstd", "configuration": {"level": self.level, "checksum": False}})
        elif self.kind == "blosc":
            codecs.append(
                {
                    "name": "blosc",
                    "configuration": {
                        "cname": self.cname,
                        "clevel": self.level,
                        "shuffle": self.shuffle,
                        "typesize": self.typesize,
                        "blocksize": 0,
                    },
                }
            )
        return codecs

    def to_json(self) -> dict[str, Any]:
        """The chain as the JSON object of docs/format.md section 6."""
        return {
            "kind": self.kind,
            "level": self.level,
            "cname": self.cname,
            "shuffle": self.shuffle,
            "typesize": self.typesize,
            "delta": self.delta,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CodecSpec:
        """The chain from its JSON object."""
        return cls(
            kind=d["kind"],
            level=int(d["level"]),
            cname=d.get("cname", ""),
            shuffle=d["shuffle"],
            typesize=int(d["typesize"]),
            delta=bool(d["delta"]),
        )

    def with_delta(self) -> CodecSpec:
        """The same chain applied to an XOR delta."""
        return CodecSpec(self.kind, self.level, self.cname, self.shuffle, self.typesize, True)


RAW = CodecSpec()
ZSTD1 = CodecSpec("zstd", 1)
ZSTD3 = CodecSpec("zstd", 3)
LZ4 = CodecSpec("blosc", 5, "lz4", "noshuffle")


def blosc_shuffle(typesize: int, cname: str = "zstd", level: int = 1) -> CodecSpec:
    """A blosc chain with byte shuffle of ``typesize``-byte elements."""
    return CodecSpec("blosc", level, cname, "shuffle", typesize)


# numcodecs objects are cheap but not free to build; keep one per spec and thread.
_local = threading.local()


def _codec(spec: CodecSpec) -> Any:
    cache: dict[CodecSpec, Any] = getattr(_local, "cache", None) or {}
    _local.cache = cache
    c = cache.get(spec)
    if c is None:
        if spec.kind == "zstd":
            c = numcodecs.Zstd(level=spec.level)
        elif spec.kind == "blosc":
            c = numcodecs.Blosc(cname=spec.cname, clevel=spec.level, shuffle=_SHUFFLE_CODE[spec.shuffle])
        else:
            raise ValueError("raw has no codec object")
        cache[spec] = c
    return c


_NP_TYPESIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64, 16: np.complex128}


def encode_chunk(spec: CodecSpec, data: memoryview) -> memoryview | bytes:
    """Encode one chunk (delta already applied). Raw returns ``data`` itself, no copy."""
    if spec.kind == "raw":
        return data
    if spec.kind == "blosc":
        ts = spec.typesize
        if len(data) % ts:
            ts = 1
        arr: np.ndarray = np.frombuffer(data, dtype=_NP_TYPESIZE[ts])
        return bytes(_codec(spec).encode(arr))
    return bytes(_codec(spec).encode(np.frombuffer(data, dtype=np.uint8)))


def decode_chunk(spec: CodecSpec, data: bytes | memoryview, out: memoryview) -> None:
    """Decode a stored chunk into ``out`` (exactly the chunk's decoded size)."""
    if spec.kind == "raw":
        if len(data) != len(out):
            raise CorruptCheckpointError(f"raw chunk has {len(data)} bytes, expected {len(out)}")
        out[:] = data
        return
    try:
        dec = _codec(spec).decode(data)
    except Exception as e:  # numcodecs raises RuntimeError/ValueError on damaged frames
        raise CorruptCheckpointError(f"cannot decode {spec.label} chunk: {e}") from e
    buf = memoryview(dec).cast("B")
    if len(buf) != len(out):
        raise CorruptCheckpointError(f"{spec.label} chunk decodes to {len(buf)} bytes, expected {len(out)}")
    out[:] = buf


def xor_into(dst: np.ndarray, a: memoryview, b: memoryview) -> None:
    """``dst = a XOR b`` bytewise, using 8-byte words where lengths allow."""
    n = len(a)
    w = n - n % 8
    if w:
        np.bitwise_xor(np.frombuffer(a[:w], np.uint64), np.frombuffer(b[:w], np.uint64), out=dst[:w].view(np.uint64))
    if n > w:
        np.bitwise_xor(np.frombuffer(a[w:], np.uint8), np.frombuffer(b[w:], np.uint8), out=dst[w:n])
