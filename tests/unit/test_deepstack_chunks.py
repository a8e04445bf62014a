"""Why every chunk must carry the DeepStack rows of its own tokens.

The scheme that sends DeepStack features only with the first block, and not with the
rest of the sequence or with resumed rounds, leaves every later visual token with
whatever DeepStack rows the receiver's blocks held before. Both schemes run here through
the same buffers and planner; only pure logic is exercised, so the in-process transport
is enough (the Mooncake tests cover the real path, with resumption)."""

from __future__ import annotations

import torch

from deepstack_runtime.buffers import BufferLayout, MultimodalDataBuffers, MultimodalItem
from deepstack_runtime.transfer.plan import plan_chunk, region_of
from tests.support.inprocess_transport import InProcessTransport

LAYOUT = BufferLayout(
    num_blocks=16, block_tokens=4, hidden_size=8, num_deepstack=3, dtype="float32"
)
TOKENS = 10  # 3 blocks; the receiver's first allocation holds 2 (8 tokens): one resume


def run(first_block_only: bool) -> tuple[MultimodalItem, MultimodalItem]:
    src, dst = MultimodalDataBuffers(LAYOUT), MultimodalDataBuffers(LAYOUT)
    assert src.deepstack is not None
    assert dst.deepstack is not None
    src.deepstack.fill_(float("nan"))  # stale memory from earlier requests, on both sides
    dst.deepstack.fill_(float("nan"))
    a, b = InProcessTransport(), InProcessTransport()
    a.register(src.base_ptr, src.nbytes)
    b.register(dst.base_ptr, dst.nbytes)
    g = torch.Generator().manual_seed(0)
    item = MultimodalItem(
        embeddings=torch.randn(TOKENS, 8, generator=g),
        deepstack=torch.randn(TOKENS, 3, 8, generator=g),
        fill_ids=torch.arange(TOKENS),
        positions=torch.zeros(TOKENS, 3, dtype=torch.int64),
    )
    src_blocks, dst_blocks = [0, 1, 2], [4, 5, 9]
    src.scatter(src_blocks, item)
    if first_block_only:
        # Only the first block's DeepStack rows are sent: later tokens' rows never arrive.
        src.deepstack[src_blocks[1:]] = float("nan")
    for first, tokens in [(0, 8), (8, 2)]:  # the round that fits, then the resumed one
        s = src_blocks[first // 4 : first // 4 + -(-tokens // 4)]
        d = dst_blocks[first // 4 : first // 4 + len(s)]
        a.write(b.session_id, plan_chunk(region_of(src), region_of(dst), s, d, tokens, 4))
    a.close()
    b.close()
    return item, dst.gather(dst_blocks, TOKENS)


def differing_tokens(want: MultimodalItem, got: MultimodalItem) -> list[int]:
    assert want.deepstack is not None
    assert got.deepstack is not None
    same = (want.deepstack == got.deepstack).all(dim=2).all(dim=1)
    return [i for i in range(TOKENS) if not bool(same[i])]


def test_first_block_only_corrupts_every_token_after_the_first_block() -> None:
    want, got = run(first_block_only=True)
    assert differing_tokens(want, got) == list(range(4, TOKENS))
    assert torch.equal(want.embeddings, got.embeddings)  # the embeddings alone look fine


def test_chunks_carrying_their_own_deepstack_rows_are_exact() -> None:
    want, got = run(first_block_only=False)
    assert differing_tokens(want, got) == []
