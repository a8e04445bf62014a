"""The vision tower writes its rows straight into a transfer pool's blocks when it
computes in the pool's dtype, with the same bits as into its own tensors."""

from __future__ import annotations

import pytest
import torch

from deepstack_runtime.backends.reference import ReferenceEncoder
from deepstack_runtime.buffers import BufferLayout, MultimodalDataBuffers, MultimodalItem
from deepstack_runtime.models.tiny import make_tiny_model

GRID = torch.tensor([[1, 4, 6], [1, 2, 2]])  # two images: 6 + 1 merged tokens


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> ReferenceEncoder:
    model = make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)
    return ReferenceEncoder(model, "cpu", torch.float32)


def pixels(encoder: ReferenceEncoder) -> torch.Tensor:
    patch = encoder.visual.config.patch_size
    temporal = encoder.visual.config.temporal_patch_size
    rows = int(GRID.prod(dim=1).sum())
    return torch.randn(
        rows, 3 * temporal * patch * patch, generator=torch.Generator().manual_seed(0)
    )


def pool(encoder: ReferenceEncoder, dtype: str) -> MultimodalDataBuffers:
    return MultimodalDataBuffers(
        BufferLayout(8, 4, encoder.hidden_size, encoder.num_deepstack, dtype)
    )


def same(a: MultimodalItem, b: MultimodalItem) -> None:
    assert torch.equal(a.embeddings, b.embeddings)
    assert a.deepstack is not None
    assert b.deepstack is not None
    assert torch.equal(a.deepstack, b.deepstack)
    assert torch.equal(a.fill_ids, b.fill_ids)
    assert torch.equal(a.positions, b.positions)


def test_rows_land_in_the_blocks_with_the_same_bits(encoder: ReferenceEncoder) -> None:
    x = pixels(encoder)
    alone = encoder.encode(x, GRID)
    buffers = pool(encoder, "float32")
    views = buffers.views([2, 3], encoder.num_tokens(GRID))
    assert views is not None
    assert encoder.writes_in_place(views)
    got = encoder.encode(x, GRID, views)
    assert got is views  # no tensor of its own: the rows are in the pool
    same(buffers.gather([2, 3], 7), alone)
    assert buffers.arena[:8].sum() == 0
    assert buffers.arena[15:].sum() == 0
    # The layers are themselves again afterwards.
    same(encoder.encode(x, GRID), alone)


def test_another_dtype_is_cast_and_copied(encoder: ReferenceEncoder) -> None:
    x = pixels(encoder)
    alone = encoder.encode(x, GRID)
    buffers = pool(encoder, "bfloat16")
    views = buffers.views([0, 1], 7)
    assert views is not None
    assert not encoder.writes_in_place(views)
    encoder.encode(x, GRID, views)
    assert torch.equal(views.embeddings, alone.embeddings.to(torch.bfloat16))
    assert views.deepstack is not None
    assert alone.deepstack is not None
    assert torch.equal(views.deepstack, alone.deepstack.to(torch.bfloat16))


def test_a_grid_the_tower_cannot_merge_is_refused(encoder: ReferenceEncoder) -> None:
    with pytest.raises(ValueError, match="multiples of the merge size"):
        encoder.num_tokens(torch.tensor([[1, 3, 4]]))
