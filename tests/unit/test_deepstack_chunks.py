"""Why every chunk must carry the DeepStack rows of its own tokens.

The scheme that sends DeepStack features only with the first block (and skips them on
resumed rounds) leaves every later visual token with stale DeepStack rows. This runs both
schemes through the same planner and buffers; only the pure logic is exercised here, so
the in-process transport is enough (the Mooncake tests cover the real path)."""

from __future__ import annotations

import torch

from deepstack_runtime.buffers import BufferLayout, MultimodalDataBuffers, MultimodalItem
from deepstack_runtime.transfer.inprocess import InProcessTransport
from deepstack_runtime.transfer.plan import RegionInfo, WriteEntry, plan_chunk

LAYOUT = BufferLayout(
    num_blocks=16, block_tokens=4, hidden_size=8, num_deepstack=3, dtype="float32"
)
TOKENS = 10  # 3 blocks; the receiver's first allocation holds 2 (8 tokens): one resume


def regions(b: MultimodalDataBuffers) -> dict[str, RegionInfo]:
    return {r.payload: RegionInfo(r.base_ptr, r.block_bytes, r.token_bytes) for r in b.regions()}


def run(first_block_only: bool) -> tuple[MultimodalItem, MultimodalItem]:
    src, dst = MultimodalDataBuffers(LAYOUT), MultimodalDataBuffers(LAYOUT)
    assert dst.deepstack is not None
    dst.deepstack.fill_(float("nan"))  # stale memory from an earlier request
    a, b = InProcessTransport(), InProcessTransport()
    for buffers, t in ((src, a), (dst, b)):
        for r in buffers.regions():
            t.register(r.base_ptr, r.nbytes)
    g = torch.Generator().manual_seed(0)
    item = MultimodalItem(
        embeddings=torch.randn(TOKENS, 8, generator=g),
        deepstack=torch.randn(TOKENS, 3, 8, generator=g),
        fill_ids=torch.arange(TOKENS),
        positions=torch.zeros(TOKENS, 3, dtype=torch.int64),
    )
    src_blocks, dst_blocks = [0, 1, 2], [4, 5, 9]
    src.scatter(src_blocks, item)
    rounds = [(0, 8), (8, 2)]  # (first token, tokens): the fitted round, then the resume
    for round_no, (first, tokens) in enumerate(rounds):
        s = src_blocks[first // 4 : first // 4 + -(-tokens // 4)]
        d = dst_blocks[first // 4 : first // 4 + len(s)]
        entries = plan_chunk(regions(src), regions(dst), s, d, tokens, 4)
        if first_block_only:
            entries = [e for e in entries if e.payload != "deepstack"]
            if round_no == 0:
                ds = regions(src)["deepstack"]
                entries.append(
                    WriteEntry(
                        "deepstack",
                        ds.base_ptr + s[0] * ds.block_bytes,
                        regions(dst)["deepstack"].base_ptr + d[0] * ds.block_bytes,
                        ds.block_bytes,
                    )
                )
        a.write(b.session_id, entries)
    a.close()
    b.close()
    return item, dst.gather(dst_blocks, TOKENS)


def differing_tokens(want: MultimodalItem, got: MultimodalItem) -> list[int]:
    assert want.deepstack is not None
    assert got.deepstack is not None
    same = (want.deepstack == got.deepstack).all(dim=(1, 2))
    return [i for i in range(TOKENS) if not bool(same[i])]


def test_first_block_only_corrupts_every_token_after_the_first_block() -> None:
    want, got = run(first_block_only=True)
    assert differing_tokens(want, got) == list(range(4, TOKENS))
    assert torch.equal(want.embeddings, got.embeddings)  # the embeddings alone look fine


def test_chunks_carrying_their_own_deepstack_rows_are_exact() -> None:
    want, got = run(first_block_only=False)
    assert differing_tokens(want, got) == []
