"""The snapshot copy: any split of the stream into ranges, copied on one core (the background copy thread's
way) or by ``Tensor.copy_`` (the barrier's way), fills the buffer exactly as one synchronous copy does."""

from __future__ import annotations

import itertools

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from asymstore.dtypes import info
from asymstore.layout import plan_layout
from asymstore.snapshot import copy_all, copy_range
from tests.helpers import random_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.complex64]


def _tensors(specs: list[tuple[int, int, int]], seed: int) -> dict[str, torch.Tensor]:
    """Tensors of mixed dtypes, some of them views that a plain ``memmove`` must not copy as they lie
    (transposed, conjugated, negated)."""
    out: dict[str, torch.Tensor] = {}
    for i, (d, n, kind) in enumerate(specs):
        dtype = DTYPES[d]
        t = random_tensor(dtype, (n, 3), seed + i)
        if kind == 1:
            t = t.t()  # not contiguous
        elif kind == 2 and dtype.is_complex:
            t = t.conj()  # lazy conjugate bit
        elif kind == 3 and dtype.is_complex:
            t = torch._neg_view(t)  # lazy negative bit
        out[f"t{i}"] = t
    return out


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.integers(0, len(DTYPES) - 1), st.integers(0, 700), st.integers(0, 3)), min_size=1, max_size=6
    ),
    cuts=st.lists(st.floats(0, 1), max_size=8),
    single=st.lists(st.booleans(), min_size=9, max_size=9),
    align=st.sampled_from([8, 64, 4096]),
    seed=st.integers(0, 2**16),
)
@example(specs=[(6, 5, 2), (6, 7, 3), (0, 9, 1)], cuts=[], single=[True] * 9, align=64, seed=1)  # whole views
@example(specs=[(6, 5, 2), (6, 7, 3), (0, 9, 1)], cuts=[0.1, 0.5, 0.7], single=[True] * 9, align=64, seed=2)
def test_ranges_on_one_core_equal_one_synchronous_copy(
    specs: list[tuple[int, int, int]], cuts: list[float], single: list[bool], align: int, seed: int
) -> None:
    tensors = _tensors(specs, seed)
    layout = plan_layout(
        [(k, info(t.dtype).torch_name, tuple(t.shape), t.numel() * t.element_size()) for k, t in tensors.items()],
        align=align,
    )
    want = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    copy_all(want, layout, tensors)
    got = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    bounds = sorted({0, layout.total_bytes, *(int(c * layout.total_bytes) for c in cuts)})
    first = 0
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        first = copy_range(got, layout, tensors, lo, hi, first=first, single_threaded=single[i])
    for e in layout.tensors:  # the padding between tensors is not part of the stream's content
        assert torch.equal(got[e.offset : e.end], want[e.offset : e.end]), e.name
    # and what was copied is the tensors' values (a lazily conjugated/negated view is resolved)
    for e in layout.tensors:
        t = tensors[e.name].resolve_conj().resolve_neg().contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        assert torch.equal(got[e.offset : e.end], raw), e.name
