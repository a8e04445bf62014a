from __future__ import annotations

import pytest
import torch

from deepstack_runtime.buffers import (
    PARALLEL_COPY_BYTES,
    BufferLayout,
    MultimodalDataBuffers,
    MultimodalItem,
    copy_rows,
)


def item(
    tokens: int, k: int, hidden: int = 8, dtype: torch.dtype = torch.float32
) -> MultimodalItem:
    g = torch.Generator().manual_seed(tokens)
    return MultimodalItem(
        embeddings=torch.randn(tokens, hidden, generator=g).to(dtype),
        deepstack=torch.randn(tokens, k, hidden, generator=g).to(dtype) if k else None,
        fill_ids=torch.arange(tokens),
        positions=torch.arange(tokens * 3).view(tokens, 3),
    )


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("blocks", [[0, 1, 2], [5, 1, 3], [2, 3, 7]])
def test_scatter_then_gather_is_identity(k: int, blocks: list[int]) -> None:
    buffers = MultimodalDataBuffers(BufferLayout(8, 4, 8, k, "float32"))
    original = item(10, k)
    buffers.scatter(blocks, original)
    back = buffers.gather(blocks, 10)
    assert torch.equal(back.embeddings, original.embeddings)
    assert torch.equal(back.positions, original.positions)
    if k:
        assert back.deepstack is not None
        assert original.deepstack is not None
        assert torch.equal(back.deepstack, original.deepstack)
    else:
        assert back.deepstack is None
    views = buffers.views(blocks, 10)
    if blocks == sorted(blocks) and blocks[-1] - blocks[0] == len(blocks) - 1:
        assert views is not None  # one run: read in place
        assert torch.equal(views.embeddings, original.embeddings)
        assert views.embeddings.data_ptr() == buffers.embeddings[blocks[0], 0].data_ptr()
        if k:
            assert views.deepstack is not None
            assert original.deepstack is not None
            assert torch.equal(views.deepstack, original.deepstack)
        assert torch.equal(views.positions, original.positions)
    else:
        assert views is None  # scattered blocks are gathered instead


def test_no_deepstack_costs_nothing() -> None:
    with_k = MultimodalDataBuffers(BufferLayout(16, 4, 8, 3, "bfloat16"))
    without = MultimodalDataBuffers(BufferLayout(16, 4, 8, 0, "bfloat16"))
    assert without.deepstack is None
    assert without.layout.payload_bytes(5)["deepstack"] == 0
    assert with_k.nbytes - without.nbytes == 16 * 4 * 3 * 8 * 2


def test_payload_bytes_add_up_to_what_moves() -> None:
    layout = BufferLayout(16, 4, 8, 3, "bfloat16")
    for tokens in (1, 3, 4, 5, 17):
        parts = layout.payload_bytes(tokens)
        assert sum(parts.values()) == layout.chunk_bytes(tokens)
        assert parts["embedding"] == tokens * 8 * 2
        assert parts["deepstack"] == tokens * 3 * 8 * 2


def test_views_share_the_arena() -> None:
    buffers = MultimodalDataBuffers(BufferLayout(4, 2, 8, 2, "float32"))
    buffers.embeddings[1, 1].fill_(1.0)
    assert buffers.deepstack is not None
    buffers.deepstack[1, 1].fill_(2.0)
    buffers.fill_ids[1, 1] = 7
    assert buffers.arena[:2].sum() == 0  # block 0
    assert buffers.arena[4:].sum() == 0  # blocks 2, 3
    again = buffers.gather([1], 2)
    assert again.fill_ids.tolist() == [0, 7]
    assert again.embeddings[1].tolist() == [1.0] * 8


def test_checksum_ignores_stale_rows_past_the_end() -> None:
    buffers = MultimodalDataBuffers(BufferLayout(2, 4, 8, 0, "float32"))
    buffers.embeddings.fill_(7.0)  # stale data from an earlier request
    buffers.scatter([0], item(2, 0))
    clean = MultimodalDataBuffers(BufferLayout(2, 4, 8, 0, "float32"))
    clean.scatter([0], item(2, 0))
    assert buffers.checksums([0], 2) == clean.checksums([0], 2)


def test_checksums_see_every_part_of_a_record() -> None:
    buffers = MultimodalDataBuffers(BufferLayout(4, 4, 8, 3, "bfloat16"))
    buffers.scatter([0, 1], item(6, 3, dtype=torch.bfloat16))
    before = buffers.checksums([0, 1], 6)
    assert len(before) == 2
    for view in (buffers.embeddings, buffers.fill_ids, buffers.positions, buffers.deepstack):
        assert view is not None
        saved = view[1, 1].clone()
        view[1, 1] = view[1, 1] + 1
        assert buffers.checksums([0, 1], 6)[1] != before[1]
        view[1, 1] = saved
    assert buffers.checksums([0, 1], 6) == before


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (item(10, 2), r"deepstack must be \[10, 3, 8\]"),
        (item(10, 3, hidden=4), r"embeddings must be \[10, 8\]"),
        (item(10, 3, dtype=torch.float16), "embeddings must be"),
    ],
)
def test_scatter_refuses_items_of_another_shape(bad: MultimodalItem, message: str) -> None:
    buffers = MultimodalDataBuffers(BufferLayout(8, 4, 8, 3, "float32"))
    with pytest.raises(ValueError, match=message):
        buffers.scatter([0, 1, 2], bad)


def test_layout_validation() -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        BufferLayout(1, 1, 1, 0, "int8")
    assert BufferLayout(4, 16, 8, 3, "float32").compatible(BufferLayout(64, 16, 8, 3, "float32"))
    assert not BufferLayout(4, 16, 8, 3, "float32").compatible(BufferLayout(4, 8, 8, 3, "float32"))


def test_chunks_of_an_item_scatter_and_gather_at_their_offsets() -> None:
    buffers = MultimodalDataBuffers(BufferLayout(8, 4, 8, 3, "float32"))
    original = item(10, 3)
    buffers.scatter([6, 7], original, start=0, count=8)
    buffers.scatter([2], original, start=8)
    out = buffers.empty_item(10)
    buffers.gather([2], 2, out, start=8)
    buffers.gather([6, 7], 8, out, start=0)
    assert torch.equal(out.embeddings, original.embeddings)
    assert out.deepstack is not None
    assert original.deepstack is not None
    assert torch.equal(out.deepstack, original.deepstack)
    with pytest.raises(ValueError, match="not a chunk"):
        buffers.scatter([0], original, start=3, count=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
@pytest.mark.parametrize("rows", [3, 1 + PARALLEL_COPY_BYTES // 4096])  # one thread; torch's
def test_copy_rows_is_bit_exact_into_strided_views(dtype: torch.dtype, rows: int) -> None:
    # A strided destination, as a block's embedding rows inside token records are.
    width = 4096 // torch.empty(0, dtype=dtype).element_size()
    records = torch.zeros(rows, 2 * width, dtype=dtype)
    src = (torch.randn(rows, width) * 1e4).to(dtype)
    src[0, :4] = torch.tensor([float("nan"), float("-inf"), -0.0, 1e-40]).to(dtype)
    copy_rows(records[:, width:], src)
    assert torch.equal(records[:, width:].view(torch.uint8), src.view(torch.uint8))
    assert not records[:, :width].any()  # nothing outside the view was written
