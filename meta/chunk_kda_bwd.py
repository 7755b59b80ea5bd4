"""kda::chunk_kda_bwd: the chunked pure-PyTorch backward of KDA (the CPU implementation and the
oracle for the backward kernels). Hand-derived; no autograd. Math: docs/kda_math.md §3.

Per chunk (rows i, j of C = 64 tokens; G the chunk-local cumulative gate; S₀ the state entering the
chunk, S₁ the state leaving it; E[i,j,d] = exp(G_id − G_jd) for j ≤ i, 0 above the diagonal):

    A_qk = scale·Σ_d q_i k_j E (j ≤ i)    A_kk = β_i·Σ_d k_i k_j E (j < i)    T = (I + A_kk)^-1
    w = T(β⊙k⊙e^G)    u = T(β⊙v)    v_n = u − wS₀
    o  = scale(q⊙e^G)S₀ + A_qk v_n
    S₁ = Diag(e^{G_L})S₀ + (k⊙e^{G_L−G})ᵀ v_n          (L = last row of the chunk)

Given dO and dS₁ (dS₁ of the last chunk is dht), the backward of one chunk is:

    dv_n  = A_qkᵀ dO + (k⊙e^{G_L−G}) dS₁
    dS₀   = scale(q⊙e^G)ᵀ dO + Diag(e^{G_L}) dS₁ − wᵀ dv_n        (the reverse scan over chunks)
    dA_qk = dO v_nᵀ (on j ≤ i)     d(q⊙e^G) = scale·dO S₀ᵀ        d(k⊙e^{G_L−G}) = v_n dS₁ᵀ
    du = dv_n    dw = −dv_n S₀ᵀ    dT = du(β⊙v)ᵀ + dw(β⊙k⊙e^G)ᵀ
    d(β⊙v) = Tᵀdu    d(β⊙k⊙e^G) = Tᵀdw    dA_kk = strictly_lower(−Tᵀ dT Tᵀ)   (from dT⁻¹ = −T dA T)

The intra-chunk backward of A = Σ_d a_i b_j E with M = dA (times scale or β_i) gives
da_i = Σ_j M_ij b_j E_ij, db_j = Σ_i M_ij a_i E_ij, and, since ∂E_ij/∂G_i = E_ij = −∂E_ij/∂G_j,
dG += a⊙da − b⊙db (for A_kk: a = b = k; dβ_i = Σ_j dA_kk[i,j] A_kk[i,j]/β_i = k_i·da_i/β_i).
Every other gate term is x⊙dx for each factor x = y⊙e^{±G}: +for e^G, −for e^{G_L−G} (whose
sum over rows goes to G_L, together with e^{G_L}⊙Σ_v(dS₁⊙S₀) from the state decay). Finally
dg = the reverse chunk-local cumsum of dG (G_i = Σ_{s≤i} g_s), and with use_qk_l2norm the norm's
backward dx = r(dy − y(y·dy)), y = x·r, r = (Σx² + 1e-6)^-1/2. With the in-op gate
(g = −e^{A_log}·softplus(z + dt_bias), or L·σ(e^{A_log}·(z + dt_bias)) with gate_lower_bound L),
dg goes through kda_recurrent.kda_gate_bwd to dz, dA_log and ddt_bias.

Every exponent formed is G_i − G_j with i ≥ j, G_L − G_i or G_i (all ≤ 0): exact for any gate.
Zero padding (T to a multiple of C, varlen sequences to [N, T]) is exact, and padded_to_pack is
the adjoint of pack_to_padded on the valid positions, so it scatters the gradients back.
"""

import torch

from .chunk_kda import (
    CHUNK_SIZE,
    chunk_kda_bwd_meta,
    chunk_local_cumsum,
    intra_chunk,
    pack_to_padded,
    pad_to_chunks,
    padded_to_pack,
    wy_inverse,
)
from .kda_recurrent import accumulation_dtype, kda_gate, kda_gate_bwd, l2norm


def chunk_kda_bwd_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    scale: float,
    use_qk_l2norm: bool,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    gate_lower_bound: float | None = None,
) -> tuple[torch.Tensor, ...]:
    """Chunked KDA backward (C = 64) in the accumulation dtype: gradients (dq, dk, dv, dg, dbeta,
    dh0, dA_log, ddt_bias) of chunk_kda_fwd_reference's (o, final_state) for the cotangents do
    and dht (None = 0). Same contract and outputs as chunk_kda_bwd_meta (dh0 is empty [0] without
    an initial state, dA_log and ddt_bias without the in-op gate, where dg is the gradient of z)."""
    outs = chunk_kda_bwd_meta(
        q, k, v, g, beta, initial_state, cu_seqlens, do, dht, scale, use_qk_l2norm,
        A_log=A_log, dt_bias=dt_bias, gate_lower_bound=gate_lower_bound,
    )
    acc = accumulation_dtype(q.dtype)
    z = g
    if A_log is not None:
        g = kda_gate(z, A_log, dt_bias, gate_lower_bound)
    q_in, k_in, v, g, beta, do = (x.to(acc) for x in (q, k, v, g, beta, do))
    q, k = (l2norm(q_in), l2norm(k_in)) if use_qk_l2norm else (q_in, k_in)
    if cu_seqlens is not None:
        q, k, v, g, beta, do = (pack_to_padded(x, cu_seqlens) for x in (q, k, v, g, beta, do))
    *grads, dh0 = chunked_delta_rule_bwd(q, k, v, g, beta, scale, initial_state, do, dht)
    if cu_seqlens is not None:
        grads = [padded_to_pack(x, cu_seqlens) for x in grads]
    if use_qk_l2norm:
        grads[0], grads[1] = l2norm_bwd(q_in, grads[0]), l2norm_bwd(k_in, grads[1])
    if A_log is not None:
        grads[3], dA_log, ddt_bias = kda_gate_bwd(z, A_log, dt_bias, grads[3], gate_lower_bound)
        outs[6].copy_(dA_log)
        outs[7].copy_(ddt_bias)
    for out, grad in zip(outs, grads):
        out.copy_(grad)
    if initial_state is not None:
        outs[5].copy_(dh0)
    return outs


def l2norm_bwd(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Backward of l2norm (y = x·r, r = (Σx² + 1e-6)^-1/2): dx = r·(dy − y·(y·dy))."""
    r = torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)  # the eps of l2norm
    y = x * r
    return r * (dy - y * (y * dy).sum(-1, keepdim=True))


def chunk_local_reverse_cumsum(x: torch.Tensor, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """[B, NT*C, H, K] -> reverse cumulative sum restarting at every chunk (adjoint of
    chunk_local_cumsum)."""
    B, T, H, K = x.shape
    return x.view(B, T // chunk_size, chunk_size, H, K).flip(2).cumsum(2).flip(2).reshape(B, T, H, K)


def chunked_delta_rule_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Backward of chunked_delta_rule over [B, T, H, *] (already normalised, accumulation dtype).
    Returns dq, dk, dv, dg, dbeta (input shapes) and dh0 [B, H, K, V]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g, beta, do = (pad_to_chunks(x) for x in (q, k, v, g, beta, do))
    gc = chunk_local_cumsum(g)
    C = CHUNK_SIZE
    n_chunks = q.shape[1] // C

    def chunk(x: torch.Tensor, i: int) -> torch.Tensor:  # [B, C, H, *] -> [B, H, C, *]
        return x[:, i * C : (i + 1) * C].transpose(1, 2)

    # Forward scan: recompute each chunk's A_qk, T, w, v_new and the state entering it.
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    saved = []
    for i in range(n_chunks):
        b_q, b_k, b_v, b_g, b_beta = (chunk(x, i) for x in (q, k, v, gc, beta))
        a_qk, a_kk = intra_chunk(b_q, b_k, b_g, b_beta, scale)  # [B, H, C, C]
        t_inv = wy_inverse(a_kk)
        w = t_inv @ (b_beta[..., None] * b_k * b_g.exp())  # [B, H, C, K]
        v_new = t_inv @ (b_beta[..., None] * b_v) - w @ S  # [B, H, C, V]
        saved.append((S, a_qk, t_inv, w, v_new))
        g_last = b_g[..., -1:, :]  # [B, H, 1, K]
        S = g_last.exp().mT * S + (b_k * (g_last - b_g).exp()).mT @ v_new

    # Reverse scan: dS is the gradient of the state leaving chunk i, then of the one entering it.
    dS = q.new_zeros(B, H, K, V) if dht is None else dht.to(q.dtype)
    dq, dk, dgc = (torch.empty_like(x) for x in (q, k, gc))
    dv, dbeta = torch.empty_like(v), torch.empty_like(beta)
    for i in reversed(range(n_chunks)):
        b_q, b_k, b_v, b_g, b_beta, b_do = (chunk(x, i) for x in (q, k, v, gc, beta, do))
        grads, dS = chunk_bwd(b_q, b_k, b_v, b_g, b_beta, b_do, dS, *saved[i], scale)
        for out, grad in zip((dq, dk, dv, dgc, dbeta), grads):
            out[:, i * C : (i + 1) * C] = grad.transpose(1, 2)
    dg = chunk_local_reverse_cumsum(dgc)
    return dq[:, :T], dk[:, :T], dv[:, :T], dg[:, :T], dbeta[:, :T], dS


def chunk_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gc: torch.Tensor,
    beta: torch.Tensor,
    do: torch.Tensor,
    dS1: torch.Tensor,
    S0: torch.Tensor,
    a_qk: torch.Tensor,
    t_inv: torch.Tensor,
    w: torch.Tensor,
    v_new: torch.Tensor,
    scale: float,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Backward of one chunk ([B, H, C, *] inputs, states [B, H, K, V]) given dS1, the gradient
    of the state leaving it. Returns (dq, dk, dv, dG, dbeta) with dG w.r.t. the chunk-local
    cumulative gate, and dS0, the gradient of the state entering it."""
    g_last = gc[..., -1:, :]  # [B, H, 1, K]
    q_g = q * gc.exp()  # [B, H, C, K]
    k_g = beta[..., None] * k * gc.exp()  # [B, H, C, K]  (w = T k_g)
    v_b = beta[..., None] * v  # [B, H, C, V]        (u = T v_b)
    k_last = k * (g_last - gc).exp()  # [B, H, C, K]  (S1 += k_lastᵀ v_new)

    dv_new = a_qk.mT @ do + k_last @ dS1  # [B, H, C, V]
    dS0 = scale * q_g.mT @ do + g_last.exp().mT * dS1 - w.mT @ dv_new  # [B, H, K, V]
    d_aqk = do @ v_new.mT  # [B, H, C, C]; its upper part meets zero decay in intra_chunk_bwd
    dq_g = scale * do @ S0.mT  # [B, H, C, K]
    dk_last = v_new @ dS1.mT  # [B, H, C, K]
    dw = -dv_new @ S0.mT  # [B, H, C, K]
    dt = dv_new @ v_b.mT + dw @ k_g.mT  # [B, H, C, C]
    dv_b = t_inv.mT @ dv_new  # [B, H, C, V]
    dk_g = t_inv.mT @ dw  # [B, H, C, K]
    d_akk = -(t_inv.mT @ dt @ t_inv.mT).tril(-1)  # [B, H, C, C]

    dq, dk, dG, dbeta = intra_chunk_bwd(q, k, gc, beta, scale, d_aqk, d_akk)
    dq = dq + dq_g * gc.exp()
    dk = dk + dk_g * beta[..., None] * gc.exp() + dk_last * (g_last - gc).exp()
    dv = dv_b * beta[..., None]
    dbeta = dbeta + (dv_b * v).sum(-1) + (dk_g * k * gc.exp()).sum(-1)
    dG = dG + dq_g * q_g + dk_g * k_g - dk_last * k_last
    # G_last enters through k_last (every row) and through the decay of S0.
    dG_last = (dk_last * k_last).sum(-2, keepdim=True) + (dS1 * S0).sum(-1)[..., None, :] * g_last.exp()
    dG = torch.cat([dG[..., :-1, :], dG[..., -1:, :] + dG_last], dim=-2)
    return (dq, dk, dv, dG, dbeta), dS0


def intra_chunk_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    gc: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    d_aqk: torch.Tensor,
    d_akk: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Backward of intra_chunk: given dA_qk and dA_kk [B, H, C, C], returns the contributions to
    dq, dk, dG (w.r.t. gc) and dbeta. The decay is zero above the diagonal, so dA_qk's upper part
    drops out; dA_kk must be strictly lower (the diagonal decay is 1)."""
    C = q.shape[-2]
    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = gc[..., :, None, :] - gc[..., None, :, :]  # [B, H, C(i), C(j), K]
    decay = diff.masked_fill(~incl[..., None], float("-inf")).exp()  # zero above the diagonal
    m_qk = d_aqk * scale
    dq = torch.einsum("bhij,bhijd,bhjd->bhid", m_qk, decay, k)
    dk_from_qk = torch.einsum("bhij,bhijd,bhid->bhjd", m_qk, decay, q)
    dk_row_raw = torch.einsum("bhij,bhijd,bhjd->bhid", d_akk, decay, k)  # without beta_i
    dk_row = beta[..., None] * dk_row_raw
    dk_col = torch.einsum("bhij,bhijd,bhid->bhjd", d_akk * beta[..., None], decay, k)
    dk = dk_from_qk + dk_row + dk_col
    dG = q * dq - k * dk_from_qk + k * dk_row - k * dk_col
    dbeta = (k * dk_row_raw).sum(-1)
    return dq, dk, dG, dbeta
