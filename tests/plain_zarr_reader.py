"""Read an asymstore checkpoint with nothing but zarr-python and numpy.

This file is executable format documentation: it uses only the public zarr v3 objects
and the JSON manifest, never asymstore.

Layout of a tier root (a zarr group)::

    zarr.json                          root group
    step_000000000042/                 one group per step
        zarr.json                      group; attributes["asymstore"] is the manifest (JSON)
        COMMIT                         written last; a step without it is incomplete
        <label>/zarr.json              one 1-D uint8 array per codec chain ("raw", "zstd3", ...)
        <label>/c/<k>                  shard k of that array = one partition of the stream

A checkpoint is one byte stream. ``manifest["layout"]["tensors"]`` lists
``[name, torch_dtype, shape, offset, nbytes]`` (little-endian, C order, at ``offset``);
``manifest["numpy_view_dtypes"]`` maps each torch dtype to a numpy dtype with the same
bytes (bfloat16 and float8 are exposed as unsigned ints of the same width).
``manifest["partitions"]`` lists ``[index, start, nbytes, label, shard, stored_bytes, crcs]``:
stream bytes ``[start, start + nbytes)`` are elements
``[shard * partition_bytes, shard * partition_bytes + nbytes)`` of array ``<label>``.
If that array's attributes say ``{"asymstore": {"transform": {"xor_with_step": B}}}``,
the stored bytes are the XOR of the real bytes with the same stream bytes of step ``B``.

Usage: ``python plain_zarr_reader.py ROOT [STEP]`` prints ``{name: [numpy_view_dtype,
torch_dtype, shape, sha256]}`` as JSON for the newest (or the given) committed step.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import zarr


def committed_steps(root: str) -> list[int]:
    """Steps whose COMMIT marker exists (complete checkpoints), oldest first."""
    out = []
    for name in os.listdir(root):
        if name.startswith("step_") and os.path.exists(os.path.join(root, name, "COMMIT")):
            out.append(int(name[5:]))
    return sorted(out)


def manifest(root: str, step: int) -> dict:
    group = zarr.open_group(os.path.join(root, f"step_{step:012d}"), mode="r")
    return dict(group.attrs["asymstore"])


def read_stream(root: str, step: int) -> np.ndarray:
    """The checkpoint's whole byte stream (uint8), deltas resolved."""
    m = manifest(root, step)
    group = zarr.open_group(os.path.join(root, f"step_{step:012d}"), mode="r")
    P = m["partition_bytes"]
    stream = np.zeros(m["layout"]["total_bytes"], dtype=np.uint8)
    base_stream = None
    for index, start, nbytes, label, shard, _stored, _crcs in m["partitions"]:
        arr = group[label]
        stream[start : start + nbytes] = arr[shard * P : shard * P + nbytes]
        transform = arr.attrs["asymstore"].get("transform")
        if transform and transform.get("xor_with_step") is not None:
            if base_stream is None:
                base_stream = read_stream(root, int(transform["xor_with_step"]))
            stream[start : start + nbytes] ^= base_stream[start : start + nbytes]
    return stream


def read_tensors(root: str, step: int) -> dict[str, np.ndarray]:
    """name -> numpy array (bfloat16/float8 as same-width unsigned int views)."""
    m = manifest(root, step)
    stream = read_stream(root, step)
    views = m["numpy_view_dtypes"]
    out = {}
    for name, dtype, shape, offset, nbytes in m["layout"]["tensors"]:
        out[name] = stream[offset : offset + nbytes].view(np.dtype(views[dtype])).reshape(shape)
    return out


def digests(root: str, step: int) -> dict[str, list]:
    m = manifest(root, step)
    views = m["numpy_view_dtypes"]
    tensors = read_tensors(root, step)
    return {
        name: [views[dtype], dtype, list(shape), hashlib.sha256(tensors[name].tobytes()).hexdigest()]
        for name, dtype, shape, _o, _n in m["layout"]["tensors"]
    }


def main(argv: list[str]) -> int:
    root = argv[1]
    steps = committed_steps(root)
    step = int(argv[2]) if len(argv) > 2 else steps[-1]
    json.dump({"steps": steps, "step": step, "tensors": digests(root, step)}, sys.stdout)
    assert "asymstore" not in sys.modules and "torch" not in sys.modules, "the plain reader imported asymstore/torch"
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
