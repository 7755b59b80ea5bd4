"""Cache memory of the hybrid and of an all-MLA layer pattern (the comparison of
bench/bench_hybrid_vs_mla.py): the config's byte arithmetic against the doc's 48B facts and against
the buffers a model allocates, and the all-MLA pattern's caches against its full forward."""

import dataclasses

import pytest
import torch

from kda_ops import KimiLinearConfig, KimiLinearForCausalLM


def all_mla(config: KimiLinearConfig) -> KimiLinearConfig:
    return dataclasses.replace(config, full_attn_layers=list(range(config.num_hidden_layers)), kda_layers=[])


def test_48b_bytes_match_the_doc():
    hybrid = KimiLinearConfig.preset("kimi-linear-48b")
    assert hybrid.latent_cache_bytes_per_token() == 8064
    assert all_mla(hybrid).latent_cache_bytes_per_token() == 31104
    assert 1 - 8064 / 31104 == pytest.approx(0.741, abs=5e-4)
    conv = 3 * 4096 * 3 * 2
    assert hybrid.kda_state_bytes_per_sequence() == 40 * 2**20 + 20 * conv  # 20 KDA layers
    assert all_mla(hybrid).kda_state_bytes_per_sequence() == 0


@pytest.mark.parametrize(
    "pattern, dtype",
    [
        pytest.param("hybrid", torch.bfloat16, id="hybrid-bf16"),
        pytest.param("hybrid", torch.float32, id="hybrid-fp32"),
        pytest.param("all-mla", torch.bfloat16, id="all-mla-bf16"),
    ],
)
def test_bytes_match_the_allocated_caches(pattern, dtype):
    config = KimiLinearConfig.preset("micro")
    config = all_mla(config) if pattern == "all-mla" else config
    model = KimiLinearForCausalLM(config, dtype=dtype)
    max_batch, max_len = 3, 64
    model.allocate_caches(max_batch, max_len, block_size=16)
    size = dtype.itemsize
    latent = sum(attn.latent_cache.nbytes for attn in model.mla_layers())
    kda = sum(buffer.nbytes for attn in model.kda_layers() for buffer in attn.buffers())
    assert latent == max_batch * max_len * config.latent_cache_bytes_per_token(size)
    assert kda == max_batch * config.kda_state_bytes_per_sequence(size)


def test_all_mla_pattern_prefill_then_decode_matches_forward():
    config = all_mla(KimiLinearConfig.preset("micro"))
    model = KimiLinearForCausalLM(config, dtype=torch.float64).init_weights(0)
    assert model.kda_layers() == [] and len(model.mla_layers()) == config.num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, config.vocab_size, (n + 3,), generator=generator) for n in (11, 5)]
    slots = torch.arange(2)
    model.allocate_caches(max_batch=2, max_len=32, block_size=8)
    with torch.no_grad():
        model.reset_sequences(slots)
        last = model.prefill(torch.cat([s[:-3] for s in sequences]), torch.tensor([0, 11, 16], dtype=torch.int32), slots)
        steps = [model.decode_step(torch.stack([s[-3 + t] for s in sequences]), slots) for t in range(3)]
        for i, s in enumerate(sequences):
            full = model(s[None])[0]
            torch.testing.assert_close(last[i], full[-4], rtol=1e-9, atol=1e-9)
            for t in range(3):
                torch.testing.assert_close(steps[t][i], full[-3 + t], rtol=1e-9, atol=1e-9)
