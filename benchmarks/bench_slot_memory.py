"""Persistence speed by the kind of memory the host slot lives in, on a machine whose memory was freed and reused.

A direct (``O_DIRECT``) write reads the slot's pages by DMA. Where the pages are scattered 4 KiB ones, as memory
faulted in after a large buffer was freed often is, each request holds at most the device's segment limit of
pages (254 x 4 KiB on virtio-blk), and the same bytes take more, smaller requests. Each round, before each
variant, memory is *aged* the way a training process ages it (a 1 GiB temporary faulted in, copied into a buffer
that stays, then freed), then a fresh store allocates its slot. Per variant: the persistence of a save into the
slot (``WriteReport.seconds``, the slot already allocated) and a raw ``O_DIRECT`` write of the slot's own bytes;
the baseline is a raw ``O_DIRECT`` write from a huge-page buffer allocated after the same ageing.

Variants: ``private`` (asymstore's private slot: 2 MiB-aligned, huge pages advised), ``shared`` (a file in
``/dev/shm``, the default when a process has one store), ``shared-huge`` (a file on a tmpfs mounted with
``huge=within_size``, given by ``--huge-shm-dir``; skipped without one), and ``4k-buffer`` (raw write only: a
page-aligned buffer without the huge-page advice, how private slots were allocated before).

    python -m benchmarks.bench_slot_memory [--rounds 5] [--mib 1024] [--huge-shm-dir /mnt/hshm]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

import asymstore
from asymstore.snapshot import new_host_buffer
from benchmarks._harness import (
    RESULTS,
    busy_warning,
    command_line,
    git_rev,
    machine_line,
    markdown_table,
    median,
    now,
    other_cpu_busy,
    round_order,
    write_report,
)
from benchmarks._rawio import write_direct

MiB = 1 << 20
GB = 1e9


def build_state(mib: int) -> dict[str, torch.Tensor]:
    """fp32 tensors of 64 MiB, ``mib`` MiB in all (raw writes: the values do not matter)."""
    g = torch.Generator().manual_seed(0)
    n = max(mib // 64, 1)
    return {f"layer{i}.weight": torch.randn(16 * MiB, generator=g) for i in range(n)}


class Ageing:
    """A temporary (1 GiB unless told) faulted in and copied into a buffer that stays allocated, then freed: the next
    allocations get the freed pages (the pattern of a training step's temporaries)."""

    def __init__(self, nbytes: int = 1 << 30) -> None:
        self.nbytes = nbytes
        self.held: list[mmap.mmap] = []

    def __call__(self) -> None:
        keep = mmap.mmap(-1, self.nbytes)
        keep.write(b"\1" * self.nbytes)  # the temporary: a bytes object, freed once copied
        self.held.append(keep)

    def release(self) -> None:
        for m in self.held:
            m.close()
        self.held.clear()


def aligned_4k(nbytes: int) -> torch.Tensor:
    """A page-aligned buffer without the huge-page advice."""
    raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
    skip = -raw.data_ptr() % 4096
    return raw[skip : skip + nbytes]


def raw_write(buf: torch.Tensor, path: str) -> float:
    t0 = time.perf_counter()
    write_direct(path, memoryview(buf.numpy()))
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt


def store_variant(
    kind: str, state: dict[str, torch.Tensor], nbytes: int, root: str, shm_dir: str | None
) -> tuple[float, float, float]:
    """(persist s of a second save into the slot, raw write s of the slot's bytes, snapshot s of the first save)."""
    d = tempfile.mkdtemp(dir=root)
    opts = {"host_memory": "private" if kind == "private" else "shared", "host_slots": 1, "compression": "none"}
    if shm_dir:
        opts["shm_dir"] = shm_dir
    try:
        with asymstore.Store([d], **opts) as st:  # type: ignore[arg-type]
            first = st.save(state, step=1).result()
            st.delete(1)
            rep = st.save(state, step=2).result().reports["file"]
            slot = st.host.slots[0].buffer
            assert slot is not None
            raw = raw_write(slot[:nbytes], os.path.join(d, "raw"))
        return rep.seconds, raw, first.snapshot_seconds
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=1024, help="state size (MiB, a multiple of 64)")
    ap.add_argument("--age-mib", type=int, default=1024, help="the ageing temporary's size (MiB)")
    ap.add_argument("--dir", default=None, help="where the tier lives (default: a temporary directory under /tmp)")
    ap.add_argument("--huge-shm-dir", default=None, help="a tmpfs mounted with huge=within_size (or always)")
    ap.add_argument("--out", default=f"{RESULTS}/slot_memory.md")
    a = ap.parse_args(argv)
    busy = other_cpu_busy()
    state = build_state(a.mib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    root = a.dir or tempfile.mkdtemp(prefix="asymstore-bench-slotmem-")
    shm_dirs: dict[str, str | None] = {"private": None, "shared": None}
    if a.huge_shm_dir:
        shm_dirs["shared-huge"] = a.huge_shm_dir
    kinds = [*shm_dirs, "4k-buffer"]
    persist: dict[str, list[float]] = {k: [] for k in shm_dirs}
    raw: dict[str, list[float]] = {k: [] for k in [*kinds, "baseline"]}
    snap: dict[str, list[float]] = {k: [] for k in shm_dirs}
    ageing = Ageing(a.age_mib * MiB)

    def buffer_variant(make: Callable[[int], torch.Tensor]) -> float:
        buf, pos = make(nbytes), 0
        for t in state.values():  # the state's bytes, tensor by tensor (no state-sized temporary)
            b = t.view(torch.uint8).view(-1)
            buf[pos : pos + b.numel()].copy_(b)
            pos += b.numel()
        return raw_write(buf, os.path.join(root, "raw"))

    try:
        for r in range(a.rounds):
            for k in round_order([*kinds, "baseline"], r):
                ageing()
                try:
                    if k == "baseline":
                        raw[k].append(buffer_variant(new_host_buffer))
                    elif k == "4k-buffer":
                        raw[k].append(buffer_variant(aligned_4k))
                    else:
                        p, w, s = store_variant(k, state, nbytes, root, shm_dirs[k])
                        persist[k].append(p)
                        raw[k].append(w)
                        snap[k].append(s)
                finally:
                    ageing.release()
                print(
                    f"round {r} {k}: raw {raw[k][-1]:.3f} s"
                    + (f", persist {persist[k][-1]:.3f} s" if k in persist else ""),
                    flush=True,
                )
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    def ratio(xs: list[float]) -> float:  # paired per round: the baseline's time over the variant's (speed ratio)
        return median([b / x for x, b in zip(xs, raw["baseline"], strict=False)])

    rows = []
    for k in [*kinds, "baseline"]:
        p = persist.get(k, [])
        rows.append(
            [
                f"`{k}`",
                f"{median(p):.3f}" if p else "-",
                f"{nbytes / median(p) / GB:.2f}" if p else "-",
                f"{ratio(p):.2f}x" if p else "-",
                f"{median(raw[k]):.3f}",
                f"{ratio(raw[k]):.2f}x" if k != "baseline" else "baseline",
                f"{median(snap[k]):.3f}" if snap.get(k) else "-",
            ]
        )
    md = [
        "# Persistence by the memory a host slot lives in (memory aged before each variant)",
        "",
        f"- command: `{command_line(__name__, argv)}`",
        f"- machine: {machine_line()}",
        f"- tier directory: {root} on the local disk",
        f"- block device limits: {_queue_limits()}",
        f"- transparent huge pages: {_read('/sys/kernel/mm/transparent_hugepage/enabled')}; shmem: "
        f"{_read('/sys/kernel/mm/transparent_hugepage/shmem_enabled')}",
        f"- asymstore: {git_rev()}",
        f"- date: {now().isoformat(timespec='seconds')}",
        f"- state: {nbytes / 2**30:.3f} GiB fp32; {a.rounds} rounds, variants rotating, medians; ratios paired per round "
        "against the baseline of the same round (speed over the baseline's)",
        "",
        busy_warning(busy, when="before the first round"),
        *markdown_table(
            [
                "slot memory",
                "persist s",
                "persist GB/s",
                "persist vs baseline",
                "raw write of the slot s",
                "raw vs baseline",
                "first snapshot s",
            ],
            "lrrrrrr",
            rows,
        ),
        "",
        "persist = the writer of the second save (partition writes with fsync, metadata, commit), from a slot "
        "allocated by the first; raw write = `O_DIRECT` in 64 MiB writes + fsync of the slot's bytes; baseline = the "
        "same raw write from a huge-page buffer (`new_host_buffer`) allocated after the same ageing. `first "
        "snapshot` includes faulting the new slot in.",
        "",
    ]
    if not a.huge_shm_dir:
        md += ["`shared-huge` not run: no `--huge-shm-dir` given (`mount -t tmpfs -o huge=within_size tmpfs DIR`).", ""]
    write_report(
        a.out,
        "\n".join(md),
        {"persist_s": persist, "raw_s": raw, "snapshot_s": snap, "nbytes": nbytes, "busy_before": busy},
    )
    print("\n".join(md))
    return 0


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _queue_limits() -> str:
    """max_segments / max_sectors_kb of the block devices (the first few)."""
    base = "/sys/block"
    try:
        devs = sorted(os.listdir(base))
    except OSError:
        return "unknown"
    out = []
    for d in devs:
        seg = _read(f"{base}/{d}/queue/max_segments")
        kb = _read(f"{base}/{d}/queue/max_sectors_kb")
        if seg != "unknown" and not d.startswith(("loop", "ram")):
            out.append(f"{d}: {seg} segments, {kb} KiB per request")
    return "; ".join(out[:4]) or "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
