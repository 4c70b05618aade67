"""The Triton prefill-attention kernel against `cached_attention_reference` (interpreter on CPU),
and the LLM through the dispatch: prefill + decode under the Triton backend equal the torch one."""

import pytest
import torch

from echox.attention import cached_attention, cached_attention_reference
from echox.config import LlamaConfig
from echox.llama import LlamaLM
from echox_kernels import decode_attention as decode_module
from echox_kernels import prefill_attention as prefill_module
from echox_kernels.prefill_attention import prefill_attention, tile_plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (Hq, Hkv, D): EchoX-8B, EchoX-3B, echo decoders (8 x 768, 6 x 512) and the tiny test model.
HEAD_SHAPES = [(32, 8, 128), (24, 8, 128), (12, 12, 64), (8, 8, 64), (4, 2, 16)]
BLOCK_M = tile_plan(64, torch.float32)["BLOCK_M"]  # the query tile of every interpreter case


def make_inputs(q_heads, kv_heads, dim, starts, num_queries, dtype, spare=9, seed=0):
    """Queries at positions start..start+T-1 per row, over a cache sliced (as llama.py does) to the
    last position + 1 out of a longer static cache. Keys before a row's start are its earlier turns;
    keys past its last position are another row's (hidden). key_valid has random holes, one eot
    inside every row's query range, and BOS valid. q is a transposed projection, as in llama.py."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(starts)
    positions = torch.tensor(starts)[:, None] + torch.arange(num_queries)[None, :]  # [B, T] int64
    used = int(positions.max()) + 1
    q = torch.randn(batch, num_queries, q_heads, dim, generator=gen).transpose(1, 2)
    k = torch.randn(batch, kv_heads, used + spare, dim, generator=gen)
    v = torch.randn(batch, kv_heads, used + spare, dim, generator=gen)
    key_valid = torch.rand(batch, used + spare, generator=gen) > 0.2
    key_valid[:, 0] = True
    key_valid[torch.arange(batch), positions[:, num_queries // 2]] = False  # an eot among the new tokens
    tensors = (q.to(dtype), k.to(dtype)[:, :, :used], v.to(dtype)[:, :, :used], positions, key_valid[:, :used])
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("q_heads,kv_heads,dim", HEAD_SHAPES)
def test_matches_reference_fp32(q_heads, kv_heads, dim):
    # Row 0 starts the cache; row 1 continues one at position 50. T spans two query tiles, the second ragged.
    args = make_inputs(q_heads, kv_heads, dim, [0, 50], BLOCK_M + 6, torch.float32)
    torch.testing.assert_close(prefill_attention(*args), cached_attention_reference(*args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("q_heads,kv_heads,dim", [(4, 2, 16), (24, 8, 128)])
def test_matches_reference_fp16(q_heads, kv_heads, dim):
    args = make_inputs(q_heads, kv_heads, dim, [3, 70], 37, torch.float16, seed=1)
    out = prefill_attention(*args)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, cached_attention_reference(*args), atol=2e-3, rtol=2e-3)


def test_short_prompt_tiles_fill_the_gpu():
    """EchoX-8B (32 q heads): a 256-token prompt used to launch 64 programs for 132 SMs."""
    for num_queries, fewest in ((256, 132), (40, 32)):
        plan = tile_plan(128, torch.bfloat16, num_queries, 32, sms=132)
        assert 32 * -(-num_queries // plan["BLOCK_M"]) >= fewest, plan
    assert tile_plan(128, torch.bfloat16, 4096, 32, sms=132)["BLOCK_M"] == 128  # long prompts keep big tiles


def test_small_query_tiles_match_the_reference(monkeypatch):
    """What a GPU with many SMs picks for a short prompt (32-query tiles), run in the interpreter."""
    from echox_kernels import prefill_attention as prefill
    monkeypatch.setattr(prefill, "sm_count", lambda device: 132)
    args = make_inputs(4, 2, 16, [0, 9], 40, torch.float32, seed=3)
    assert tile_plan(16, torch.float32, 40, 2 * 4, sms=132)["BLOCK_M"] == 32
    torch.testing.assert_close(prefill_attention(*args), cached_attention_reference(*args), atol=1e-4, rtol=1e-4)


def test_positions_are_read_per_query_row():
    """The contract holds for any positions, not only consecutive ones: shuffled, with gaps."""
    q, k, v, _, key_valid = make_inputs(4, 2, 16, [0, 0], 20, torch.float32, spare=0, seed=2)
    gen = torch.Generator().manual_seed(2)
    positions = torch.stack([torch.randperm(k.shape[2], generator=gen)[:20] for _ in range(2)]).to(DEVICE)
    positions[:, 0] = 0  # keeps the tile's largest position below the cache end and BOS reachable
    torch.testing.assert_close(prefill_attention(q, k, v, positions, key_valid),
                               cached_attention_reference(q, k, v, positions, key_valid), atol=1e-4, rtol=1e-4)


def test_hidden_keys_are_ignored():
    """Keys no query may see (masked, or after its position) can hold anything."""
    q, k, v, positions, key_valid = make_inputs(4, 2, 16, [0, 30], 40, torch.float32, seed=3)
    before = prefill_attention(q, k, v, positions, key_valid)
    keys = torch.arange(k.shape[2], device=DEVICE)
    # Hidden from every query of the row: masked, or past the row's last position.
    hidden = ~key_valid | (keys[None, :] > positions[:, -1:])  # [B, S]
    k = k.masked_fill(hidden[:, None, :, None], 1e4)
    v = v.masked_fill(hidden[:, None, :, None], 1e4)
    torch.testing.assert_close(prefill_attention(q, k, v, positions, key_valid), before)


def test_dispatch_runs_the_kernel_or_the_reference(kernel_calls):
    args = make_inputs(4, 2, 16, [0, 5], 12, torch.float32, seed=4)
    expected = prefill_attention(*args)
    calls = kernel_calls(prefill_module, "prefill_attention")
    torch.testing.assert_close(cached_attention(*args, backend_name="triton"), expected)
    assert len(calls) == 1
    torch.testing.assert_close(cached_attention(*args, backend_name="torch"), cached_attention_reference(*args))
    assert len(calls) == 1


def tiny_lm() -> LlamaLM:
    cfg = LlamaConfig(hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
                      intermediate_size=96, vocab_size=101, max_position_embeddings=256,
                      rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, weights large enough for peaked attention
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.08).add_(1.0 if p.dim() == 1 else 0.0)
    return model.to(DEVICE)


def run_turns(model: LlamaLM, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A first prefill, a second one continuing the cache (a new turn), then two decode steps."""
    model.body.setup_cache(ids.shape[0], 96)
    chunks = [(0, 45, None), (45, 70, 70), (70, 71, None), (71, 72, None)]  # (start, end, kv_len)
    hidden = []
    for start, end, kv_len in chunks:
        positions = torch.arange(start, end, device=DEVICE)[None].expand(ids.shape[0], -1)
        hidden.append(model(model.embed_tokens(ids[:, start:end]), positions, valid[:, start:end], kv_len))
    return torch.cat(hidden, dim=1)


def test_llm_prefill_and_decode_match_the_torch_backend(monkeypatch, kernel_calls):
    model = tiny_lm()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 101, (2, 72), generator=gen).to(DEVICE)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, [20, 44, 60]] = False  # eot keys in both prefills
    prefills, decodes = kernel_calls(prefill_module, "prefill_attention"), kernel_calls(decode_module, "decode_attention")
    with torch.no_grad():
        monkeypatch.setenv("ECHOX_BACKEND", "torch")
        expected = run_turns(model, ids, valid)
        assert prefills == decodes == []
        monkeypatch.setenv("ECHOX_BACKEND", "triton")
        got = run_turns(model, ids, valid)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert len(prefills) == len(decodes) == 2 * model.cfg.num_layers  # two prefills and two decode steps


@pytest.mark.gpu
@pytest.mark.parametrize("q_heads,kv_heads,dim", HEAD_SHAPES[:3])
def test_long_bf16_prefill_on_gpu(q_heads, kv_heads, dim):
    args = make_inputs(q_heads, kv_heads, dim, [0, 700], 1030, torch.bfloat16, seed=6)
    torch.testing.assert_close(prefill_attention(*args), cached_attention_reference(*args), atol=2e-2, rtol=2e-2)
