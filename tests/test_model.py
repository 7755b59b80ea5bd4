"""The Kimi-Linear model on CPU (micro preset): layers against independent references (naive
recurrent KDA, explicit softmax attention, a loop over experts), caches (prefill + decode against
the full forward), torch.compile capture, checkpoint IO and generation."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from expecttest import assert_expected_inline
from torch._dynamo.testing import CompileCounter

from kda_ops import KimiLinearConfig, KimiLinearForCausalLM
from kda_ops.checkpoint import CheckpointError
from kda_ops.meta.kda_recurrent import recurrent_kda
from kda_ops.moe import MoE

TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def micro_model(dtype=torch.float64, seed=0, **overrides) -> KimiLinearForCausalLM:
    config = KimiLinearConfig.preset("micro")
    for name, value in overrides.items():
        setattr(config, name, value)
    model = KimiLinearForCausalLM(config, dtype=dtype).init_weights(seed)
    # Larger than the 0.02 default so attention, gates and routing are far from uniform.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "conv1d" not in name:
                p.mul_(5)
    return model


def random_ids(*shape, seed=0, vocab=256):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- references


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_kda(attn, x):
    """Projections, F.conv1d short convolutions, the gate and beta formulas and the naive
    recurrence, written out independently of the layer's code."""
    B, T, _ = x.shape
    H, K = attn.num_heads, attn.head_dim
    W = attn.q_conv1d.weight.shape[-1]

    def short_conv(proj, conv):
        y = proj(x).transpose(1, 2)
        y = F.conv1d(F.pad(y, (W - 1, 0)), conv.weight, groups=y.shape[1])
        return F.silu(y).transpose(1, 2).reshape(B, T, H, K)

    q = short_conv(attn.q_proj, attn.q_conv1d)
    k = short_conv(attn.k_proj, attn.k_conv1d)
    v = short_conv(attn.v_proj, attn.v_conv1d)
    acc = x.dtype
    f = (attn.f_b_proj(attn.f_a_proj(x)) + attn.dt_bias.to(acc)).view(B, T, H, K)
    if attn.gate_lower_bound is None:
        g = -attn.A_log.to(acc).exp() * F.softplus(f)
    else:
        g = attn.gate_lower_bound / (1 + torch.exp(-attn.A_log.to(acc).exp() * f))
    beta = torch.sigmoid(attn.b_proj(x))
    o, _ = recurrent_kda(q, k, v, g, beta, scale=K**-0.5, use_qk_l2norm=True)
    o = rms(o, attn.o_norm.weight, attn.eps) * torch.sigmoid(attn.g_b_proj(attn.g_a_proj(x))).view(B, T, H, K)
    return attn.o_proj(o.reshape(B, T, H * K))


def reference_mla(attn, x):
    """Decompressed keys/values and an explicit causal softmax, scale (nope + rope)^-1/2."""
    B, T, _ = x.shape
    H, nope, rope, vd = attn.num_heads, attn.nope_dim, attn.rope_dim, attn.v_dim
    q = attn.q_proj(x).view(B, T, H, nope + rope)
    ckv, kpe = attn.kv_a_proj_with_mqa(x).split([attn.latent_dim, rope], -1)
    ckv = rms(ckv, attn.kv_a_layernorm.weight, 1e-6)
    k_nope, v = attn.kv_b_proj(ckv).view(B, T, H, nope + vd).split([nope, vd], -1)
    k = torch.cat([k_nope, kpe[:, :, None].expand(B, T, H, rope)], -1)
    s = torch.einsum("bthd,bshd->bhts", q, k) * (nope + rope) ** -0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshv->bthv", s.softmax(-1), v)
    return attn.o_proj(o.reshape(B, T, H * vd))


def reference_moe(moe, x):
    """Token by token, expert by expert: choose by sigmoid score + bias, weigh by the unbiased
    scores renormalised, times the routed scaling factor; plus the shared expert."""
    flat = x.reshape(-1, x.shape[-1])
    experts, top_k = moe.experts, moe.gate.top_k
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        xn = flat[n]
        scores = torch.sigmoid(moe.gate.weight.to(torch.float64) @ xn.to(torch.float64))
        chosen = torch.argsort(scores + moe.gate.e_score_correction_bias.to(torch.float64), descending=True)[:top_k]
        weights = scores[chosen] / scores[chosen].sum() * moe.gate.scaling
        for w, e in zip(weights, chosen):
            hidden = F.silu(experts.w1[e] @ xn) * (experts.w3[e] @ xn)
            out[n] += (w * (experts.w2[e] @ hidden).to(torch.float64)).to(x.dtype)
        shared = moe.shared_experts
        out[n] += shared.down_proj.weight @ (F.silu(shared.gate_proj.weight @ xn) * (shared.up_proj.weight @ xn))
    return out.view(x.shape)


def reference_model(model, ids):
    layers = model.model.layers
    h = model.model.embed_tokens(ids)
    for layer in layers:
        x = rms(h, layer.input_layernorm.weight, model.config.rms_norm_eps)
        h = h + (reference_kda if layer.is_kda else reference_mla)(layer.self_attn, x)
        x = rms(h, layer.post_attention_layernorm.weight, model.config.rms_norm_eps)
        if hasattr(layer, "block_sparse_moe"):
            h = h + reference_moe(layer.block_sparse_moe, x)
        else:
            mlp = layer.mlp
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    return model.lm_head(rms(h, model.model.norm.weight, model.config.rms_norm_eps))


# ---------------------------------------------------------------------------- config

RELEASED_CONFIG = {
    "architectures": ["KimiLinearForCausalLM"],
    "model_type": "kimi_linear",
    "vocab_size": 163840,
    "hidden_size": 2304,
    "num_hidden_layers": 27,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "intermediate_size": 9216,
    "num_attention_heads": 32,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "mla_use_nope": True,
    "first_k_dense_replace": 1,
    "num_experts": 256,
    "num_experts_per_token": 8,
    "num_shared_experts": 1,
    "moe_intermediate_size": 1024,
    "moe_router_activation_func": "sigmoid",
    "moe_renormalize": True,
    "routed_scaling_factor": 2.446,
    "use_grouped_topk": True,
    "num_expert_group": 1,
    "topk_group": 1,
    "rope_theta": 10000.0,
    "linear_attn_config": {
        "num_heads": 32,
        "head_dim": 128,
        "short_conv_kernel_size": 4,
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "kda_layers": [i for i in range(1, 28) if i not in (4, 8, 12, 16, 20, 24, 27)],
    },
}


def test_config_reads_released_layout():
    c = KimiLinearConfig.from_dict(RELEASED_CONFIG)
    assert c.full_attn_layers == [3, 7, 11, 15, 19, 23, 26]
    assert len(c.kda_layers) == 20 and 0 in c.kda_layers and 3 not in c.kda_layers
    assert (c.kda_num_heads, c.kda_head_dim, c.mla_cache_dim) == (32, 128, 576)
    assert c.extra["rope_theta"] == 10000.0
    assert KimiLinearConfig.from_dict(c.to_dict()) == c
    preset = KimiLinearConfig.preset("kimi-linear-48b")
    assert (preset.kda_layers, preset.full_attn_layers) == (c.kda_layers, c.full_attn_layers)


def test_config_gate_lower_bound_round_trips(tmp_path):
    """linear_attn_config.gate_lower_bound selects the bounded gate; absent, the released file is
    written back without it."""
    raw = dict(RELEASED_CONFIG, linear_attn_config=dict(RELEASED_CONFIG["linear_attn_config"], gate_lower_bound=-5.0))
    c = KimiLinearConfig.from_dict(raw)
    assert c.kda_gate_lower_bound == -5.0 and "linear_attn_config" not in c.extra
    c.to_json(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["linear_attn_config"]["gate_lower_bound"] == -5.0
    assert KimiLinearConfig.from_json(tmp_path) == c
    assert "gate_lower_bound" not in KimiLinearConfig.from_dict(RELEASED_CONFIG).to_dict()["linear_attn_config"]
    with pytest.raises(ValueError, match="kda_gate_lower_bound must be null or a finite number < 0, got 0.5"):
        KimiLinearConfig.from_dict(dict(raw, linear_attn_config=dict(raw["linear_attn_config"], gate_lower_bound=0.5)))


def test_config_layer_types_take_precedence(tmp_path):
    raw = dict(RELEASED_CONFIG, num_hidden_layers=4, layer_types=["kda", "full_attention", "kda", "linear_attention"])
    c = KimiLinearConfig.from_dict(raw)
    assert (c.kda_layers, c.full_attn_layers) == ([0, 2, 3], [1])
    c.to_json(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["linear_attn_config"]["full_attn_layers"] == [2]
    assert KimiLinearConfig.from_json(tmp_path) == c


@pytest.mark.parametrize(
    "linear, message",
    [
        pytest.param({"full_attn_layers": [1, 2], "kda_layers": [2, 3, 4]}, "both KDA and MLA", id="overlap"),
        pytest.param({"full_attn_layers": [1], "kda_layers": [2, 3]}, "missing \\[3\\]", id="uncovered"),
    ],
)
def test_config_rejects_inconsistent_layers(linear, message):
    with pytest.raises(ValueError, match=message):
        KimiLinearConfig.from_dict(dict(RELEASED_CONFIG, num_hidden_layers=4, linear_attn_config=linear))


def test_small_preset_matches_doc():
    c = KimiLinearConfig.preset("small")
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (256, 6, 1024)
    assert (c.kda_layers, c.full_attn_layers) == ([0, 1, 2, 4], [3, 5])
    assert (c.kda_num_heads, c.kda_head_dim, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim) == (4, 128, 4, 512, 64)
    assert (c.num_experts, c.num_experts_per_token, c.num_shared_experts) == (8, 2, 1)


# ---------------------------------------------------------------------------- parameters


def test_parameter_names_and_dtypes_follow_the_checkpoint():
    with torch.device("meta"):
        model = KimiLinearForCausalLM(KimiLinearConfig.preset("kimi-linear-48b"), dtype=torch.bfloat16)
    state = model.state_dict()
    expected = {
        "model.embed_tokens.weight": [163840, 2304],
        "lm_head.weight": [163840, 2304],
        "model.layers.0.self_attn.q_proj.weight": [4096, 2304],
        "model.layers.0.self_attn.q_conv1d.weight": [4096, 1, 4],
        "model.layers.0.self_attn.f_a_proj.weight": [128, 2304],
        "model.layers.0.self_attn.f_b_proj.weight": [4096, 128],
        "model.layers.0.self_attn.dt_bias": [4096],
        "model.layers.0.self_attn.A_log": [1, 1, 32, 1],
        "model.layers.0.self_attn.b_proj.weight": [32, 2304],
        "model.layers.0.self_attn.g_b_proj.weight": [4096, 128],
        "model.layers.0.self_attn.o_norm.weight": [128],
        "model.layers.0.self_attn.o_proj.weight": [2304, 4096],
        "model.layers.0.mlp.gate_proj.weight": [9216, 2304],
        "model.layers.3.self_attn.q_proj.weight": [6144, 2304],
        "model.layers.3.self_attn.kv_a_proj_with_mqa.weight": [576, 2304],
        "model.layers.3.self_attn.kv_a_layernorm.weight": [512],
        "model.layers.3.self_attn.kv_b_proj.weight": [8192, 512],
        "model.layers.3.self_attn.o_proj.weight": [2304, 4096],
        "model.layers.1.block_sparse_moe.gate.weight": [256, 2304],
        "model.layers.1.block_sparse_moe.gate.e_score_correction_bias": [256],
        "model.layers.1.block_sparse_moe.experts.255.w1.weight": [1024, 2304],
        "model.layers.1.block_sparse_moe.experts.0.w2.weight": [2304, 1024],
        "model.layers.1.block_sparse_moe.shared_experts.down_proj.weight": [2304, 1024],
    }
    for name, shape in expected.items():
        assert list(state[name].shape) == shape, name
    assert state["model.layers.0.self_attn.A_log"].dtype == torch.float32
    assert state["model.layers.0.self_attn.dt_bias"].dtype == torch.float32
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.0.block_sparse_moe.gate.weight" not in state
    assert sum(1 for n in state if ".experts." in n) == 26 * 256 * 3


# ---------------------------------------------------------------------------- forward vs references


@pytest.mark.parametrize("bound", [pytest.param(None, id="softplus-gate"), pytest.param(-5.0, id="bounded-gate")])
def test_kda_layer_matches_recurrent_reference(bound):
    model = micro_model(kda_gate_lower_bound=bound)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 70, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(attn(x), reference_kda(attn, x), **TOLERANCE[torch.float64])


def test_mla_layer_matches_explicit_attention():
    model = micro_model()
    attn = model.model.layers[2].self_attn
    x = torch.randn(2, 19, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(attn(x), reference_mla(attn, x), **TOLERANCE[torch.float64])


@pytest.mark.parametrize(
    "mode, dtype, tokens",
    [
        pytest.param("dense", torch.float64, 37, id="dense-fp64"),
        pytest.param("grouped", torch.float32, 37, id="grouped-fp32"),
        pytest.param("grouped", torch.float32, 1, id="grouped-fp32-one-token"),
    ],
)
def test_moe_matches_loop_over_experts(mode, dtype, tokens):
    config = KimiLinearConfig.preset("micro")
    moe = MoE(config, dtype=dtype, mode=mode)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(tokens, config.hidden_size, dtype=dtype, generator=gen)
    torch.testing.assert_close(moe(x), reference_moe(moe, x), **TOLERANCE[dtype])


def test_model_matches_layer_by_layer_references():
    model = micro_model()
    ids = random_ids(2, 45, seed=4)
    torch.testing.assert_close(model(ids), reference_model(model, ids), **TOLERANCE[torch.float64])


def test_forward_is_differentiable():
    model = micro_model(dtype=torch.float32)
    ids = random_ids(2, 20, seed=5)
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            assert not p.requires_grad, name  # chooses experts only; load balancing adjusts it
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    attn = model.model.layers[0].self_attn
    assert attn.A_log.grad.abs().sum() > 0 and attn.dt_bias.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- caches


def full_logits(model, sequence):
    with torch.no_grad():
        return model(torch.tensor([sequence]))[0]


@pytest.mark.parametrize(
    "dtype, prompt_lengths, decode_steps, bound",
    [
        pytest.param(torch.float64, [23], 5, None, id="fp64-one-prompt"),
        pytest.param(torch.float64, [9, 70, 1, 30], 4, None, id="fp64-batch-of-lengths"),
        pytest.param(torch.float32, [12, 66, 3], 3, None, id="fp32-batch-of-lengths"),
        pytest.param(torch.float64, [9, 70], 3, -5.0, id="fp64-bounded-gate"),
    ],
)
def test_prefill_then_decode_matches_full_forward(dtype, prompt_lengths, decode_steps, bound):
    model = micro_model(dtype=dtype, kda_gate_lower_bound=bound)
    model.allocate_caches(max_batch=len(prompt_lengths) + 1, max_len=80, block_size=16)
    sequences = [random_ids(n + decode_steps, seed=10 + i).tolist() for i, n in enumerate(prompt_lengths)]
    slots = torch.arange(1, len(prompt_lengths) + 1)  # slot 0 stays unused
    cu = torch.tensor([0] + prompt_lengths).cumsum(0).to(torch.int32)
    packed = torch.tensor([t for s, n in zip(sequences, prompt_lengths) for t in s[:n]])
    with torch.no_grad():
        model.reset_sequences(slots)
        prefill_logits = model.prefill(packed, cu, slots, all_logits=True)
        steps = []
        for t in range(decode_steps):
            tokens = torch.tensor([s[n + t] for s, n in zip(sequences, prompt_lengths)])
            steps.append(model.decode_step(tokens, slots))
    for i, (s, n) in enumerate(zip(sequences, prompt_lengths)):
        expected = full_logits(model, s)
        torch.testing.assert_close(prefill_logits[cu[i] : cu[i + 1]], expected[:n], **TOLERANCE[dtype])
        for t in range(decode_steps):
            torch.testing.assert_close(steps[t][i], expected[n + t], **TOLERANCE[dtype])
    assert model.seq_lens.tolist() == [0] + [n + decode_steps for n in prompt_lengths]


def test_prefill_continued_after_decode_steps():
    model = micro_model()
    model.allocate_caches(max_batch=2, max_len=64, block_size=8)
    a, b = random_ids(40, seed=20).tolist(), random_ids(30, seed=21).tolist()
    slots = torch.arange(2)
    with torch.no_grad():
        model.reset_sequences(slots)
        model.prefill(torch.tensor(a[:10] + b[:7]), torch.tensor([0, 10, 17], dtype=torch.int32), slots)
        model.decode_step(torch.tensor([a[10], b[7]]), slots)
        continued = model.prefill(
            torch.tensor(a[11:40] + b[8:30]), torch.tensor([0, 29, 51], dtype=torch.int32), slots,
            attend_to_cache=True, all_logits=True,
        )
    torch.testing.assert_close(continued[:29], full_logits(model, a)[11:], **TOLERANCE[torch.float64])
    torch.testing.assert_close(continued[29:], full_logits(model, b)[8:], **TOLERANCE[torch.float64])


# ---------------------------------------------------------------------------- compile


def test_compiled_forward_one_frame_for_three_lengths():
    torch._dynamo.reset()
    model = micro_model(dtype=torch.float32)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for i, T in enumerate((16, 33, 70)):
            ids = random_ids(1, T, seed=T)
            if i == 0:
                torch._dynamo.mark_dynamic(ids, 1)
            torch.testing.assert_close(compiled(ids), model(ids))
    assert counter.frame_count == 1


def test_compiled_decode_step_does_not_recompile():
    torch._dynamo.reset()
    model = micro_model(dtype=torch.float32)
    model.allocate_caches(max_batch=3, max_len=40, block_size=8)
    slots = torch.arange(3)
    prompt = random_ids(20, seed=30)
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    tokens = random_ids(6, 3, seed=31)
    counter = CompileCounter()
    compiled_step = torch.compile(model.decode_step, backend=counter, fullgraph=True)
    results = {}
    with torch.no_grad():
        for name, step in (("eager", model.decode_step), ("compiled", compiled_step)):
            model.reset_sequences(slots)
            model.prefill(prompt, cu, slots)
            results[name] = [step(tokens[t], slots) for t in range(6)]
    assert counter.frame_count == 1
    for eager, compiled in zip(results["eager"], results["compiled"]):
        torch.testing.assert_close(compiled, eager)


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("max_shard_bytes", [None, 60_000], ids=["single-file", "sharded"])
def test_checkpoint_round_trip(tmp_path, max_shard_bytes):
    model = micro_model(dtype=torch.bfloat16, seed=7)
    model.save_pretrained(tmp_path, max_shard_bytes=max_shard_bytes)
    assert os.path.exists(tmp_path / "model.safetensors.index.json") == (max_shard_bytes is not None)
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.A_log.dtype == torch.float32
    ids = random_ids(2, 17, seed=8)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def _edit_checkpoint(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


@pytest.mark.parametrize(
    "edit, message",
    [
        pytest.param(
            lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"),
            "missing tensors: model.layers.1.block_sparse_moe.experts.3.w2.weight",
            id="missing",
        ),
        pytest.param(
            lambda t: t.update({"model.layers.0.self_attn.extra_proj.weight": torch.zeros(2, 2)}),
            "unexpected tensors: model.layers.0.self_attn.extra_proj.weight",
            id="unexpected",
        ),
        pytest.param(
            lambda t: t.update({"model.layers.0.self_attn.A_log": torch.zeros(1, 1, 3, 1)}),
            r"wrongly shaped tensors: model.layers.0.self_attn.A_log \(expected \[1, 1, 2, 1\], found \[1, 1, 3, 1\]\)",
            id="wrong-shape",
        ),
    ],
)
def test_broken_checkpoint_names_the_tensor(tmp_path, edit, message):
    micro_model(dtype=torch.float32).save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        KimiLinearForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- generation


def test_greedy_generation_matches_argmax_of_full_forward():
    model = micro_model(dtype=torch.float32)
    prompts = [random_ids(n, seed=40 + n).tolist() for n in (3, 25, 11)]
    generated = model.generate(prompts, 6, greedy=True)
    for prompt, new in zip(prompts, generated):
        sequence = list(prompt)
        for _ in range(6):
            sequence.append(int(full_logits(model, sequence)[-1].argmax()))
        assert new == sequence[len(prompt) :]


def test_sampling_is_seeded_and_stops_at_eos():
    model = micro_model(dtype=torch.float32)
    prompts = [random_ids(n, seed=50 + n).tolist() for n in (4, 9)]
    options = dict(temperature=1.5, top_k=40, top_p=0.95, seed=123)
    first = model.generate(prompts, 24, **options)
    assert first == model.generate(prompts, 24, **options)
    assert first != model.generate(prompts, 24, **dict(options, seed=124))
    eos = first[0][5]
    stopped = model.generate(prompts, 24, eos_token_id=eos, stop_check_interval=4, **options)
    assert stopped[0] == first[0][: first[0].index(eos) + 1]
    assert all(row.count(eos) <= 1 and (eos not in row or row[-1] == eos) for row in stopped)


# ---------------------------------------------------------------------------- which kda ops run


def _kda_ops_in_compiled_graph(fn, *args) -> str:
    """The kda:: ops (with call counts) of the graph torch.compile(fullgraph=True) captures."""
    calls = {}

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "kda":
                calls[node.target.name()] = calls.get(node.target.name(), 0) + 1
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=record, fullgraph=True)(*args)
    return "\n".join(f"{name} x{count}" for name, count in sorted(calls.items()))


def test_compiled_graphs_call_the_kda_ops():
    """Snapshot of the ops each compiled path hands to the compiler (micro preset: 3 KDA layers,
    1 MLA layer). Regenerate with EXPECTTEST_ACCEPT=1 when the model's op use changes on purpose."""
    model = micro_model(dtype=torch.float32)
    model.allocate_caches(max_batch=2, max_len=32, block_size=8)
    slots = torch.arange(2)
    forward = _kda_ops_in_compiled_graph(model, random_ids(1, 20))
    assert_expected_inline(forward, """kda::chunk_kda_fwd x3""")
    prefill = _kda_ops_in_compiled_graph(model.prefill, random_ids(12), torch.tensor([0, 5, 12], dtype=torch.int32), slots)
    assert_expected_inline(prefill, """\
kda::chunk_kda_fwd x3
kda::mla_cache_write x1""")
    decode = _kda_ops_in_compiled_graph(model.decode_step, random_ids(2), slots)
    assert_expected_inline(decode, """\
kda::causal_conv1d_update x9
kda::kda_decode x3
kda::mla_cache_write x1
kda::mla_decode x1""")
