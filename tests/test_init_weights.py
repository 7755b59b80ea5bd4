"""init_weights on a model built on the meta device and materialised with to_empty (how the
48B-shaped benchmark models skip the constructors' CPU initialisation), drawn on the CPU and on
the GPU."""

import pytest
import torch

from kda_ops import KimiLinearConfig, KimiLinearForCausalLM


def meta_built(device: str) -> KimiLinearForCausalLM:
    with torch.device("meta"):
        model = KimiLinearForCausalLM(KimiLinearConfig.preset("micro"), dtype=torch.bfloat16)
    return model.to_empty(device=device)


def test_meta_built_model_gets_every_weight():
    expected = KimiLinearForCausalLM(KimiLinearConfig.preset("micro"), dtype=torch.bfloat16).init_weights(3)
    got = meta_built("cpu").init_weights(3)
    torch.testing.assert_close(got.state_dict(), expected.state_dict(), rtol=0, atol=0)


@pytest.mark.gpu
def test_weights_drawn_on_the_gpu():
    model = meta_built("cuda").init_weights(3, generator_device="cuda")
    again = meta_built("cuda").init_weights(3, generator_device="cuda")
    torch.testing.assert_close(model.state_dict(), again.state_dict(), rtol=0, atol=0)
    for name, p in model.named_parameters():
        assert p.is_cuda and torch.isfinite(p).all(), name
        if name.endswith("A_log"):
            assert ((p.exp() >= 1) & (p.exp() <= 16)).all(), name
        elif name.endswith("norm.weight"):
            assert (p == 1).all(), name
        elif name.endswith("q_proj.weight"):
            assert abs(p.float().std().item() - 0.02) < 0.002, name
