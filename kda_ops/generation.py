"""Generation with static caches: varlen prefill, then one decode step per new token, run eagerly,
through torch.compile (fullgraph; "reduce-overhead" CUDA graphs on CUDA) or as a manually captured
torch.cuda.CUDAGraph. Sampling stays on the device; the host only looks at the tokens every
`stop_check_interval` steps to stop when every sequence has produced eos.
"""

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

DECODE_MODES = ("eager", "compiled", "cuda_graph")


def sample_tokens(
    logits: Tensor,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token per row of logits [B, vocab] -> [B] int64, on the logits' device, no host sync.
    Sampling uses the exponential-race form of categorical sampling (argmax of p / Exp(1) noise)."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # the first token is always kept
        ordered = ordered.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


class DecodeRunner:
    """model.decode_step(tokens, slots) for a fixed batch of slots, in one of DECODE_MODES:
    "eager"; "compiled": torch.compile(fullgraph=True), with mode="reduce-overhead" on CUDA (CUDA
    graph trees) and the given backend elsewhere; "cuda_graph": one torch.cuda.CUDAGraph captured at
    construction (which runs decode steps: call it on freshly reset slots).
    Returned logits are the caller's own (cloned out of graph-owned memory)."""

    def __init__(self, model, slots: Tensor, mode: str = "eager", compile_backend: str = "inductor") -> None:
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
        if mode == "cuda_graph" and slots.device.type != "cuda":
            raise ValueError("decode mode 'cuda_graph' needs the model on a CUDA device")
        self.model, self.slots, self.mode = model, slots, mode
        self.on_cuda = slots.device.type == "cuda"
        if mode == "compiled":
            if self.on_cuda:
                self.step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)
            else:
                self.step = torch.compile(model.decode_step, backend=compile_backend, fullgraph=True)
        elif mode == "cuda_graph":
            self._capture()

    def _capture(self) -> None:
        B = self.slots.shape[0]
        self.static_tokens = torch.zeros(B, dtype=torch.long, device=self.slots.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # JIT-compiles the kernels outside the capture
                self.model.decode_step(self.static_tokens, self.slots)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_logits = self.model.decode_step(self.static_tokens, self.slots)

    @torch.no_grad()
    def __call__(self, tokens: Tensor) -> Tensor:
        if self.mode == "cuda_graph":
            self.static_tokens.copy_(tokens)
            self.graph.replay()
            return self.static_logits.clone()
        if self.mode == "compiled" and self.on_cuda:
            torch.compiler.cudagraph_mark_step_begin()
            return self.step(tokens, self.slots).clone()
        return (self.step if self.mode == "compiled" else self.model.decode_step)(tokens, self.slots)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_runner(model, batch: int, mode: str, compile_backend: str) -> DecodeRunner:
    """One runner per (mode, batch, backend), kept on the model until its caches are reallocated."""
    runners = model.__dict__.setdefault("_decode_runners", {})
    key = (mode, batch, compile_backend)
    if key not in runners:
        slots = torch.arange(batch, device=model.device)
        model.reset_sequences(slots)
        runners[key] = DecodeRunner(model, slots, mode, compile_backend)
    return runners[key]


def _prefill_function(model, compiled: bool, compile_backend: str):
    if not compiled:
        return model.prefill
    cached = model.__dict__.get("_compiled_prefill")
    if cached is None or cached[0] != compile_backend:
        fn = torch.compile(model.prefill, backend=compile_backend, fullgraph=True, dynamic=True)
        model.__dict__["_compiled_prefill"] = cached = (compile_backend, fn)
    return cached[1]


def _as_prompt_lists(prompts) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"generate: a prompt tensor must be [batch, length], got shape {list(prompts.shape)}")
        return prompts.tolist()
    out = [list(map(int, p)) for p in prompts]
    if not out or any(len(p) == 0 for p in out):
        raise ValueError("generate: needs at least one prompt, and every prompt needs at least one token")
    return out


def _trim_at_eos(tokens: list[int], eos_token_id: int | None) -> list[int]:
    if eos_token_id is not None and eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id) + 1]
    return tokens


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]] | Tensor,
    max_new_tokens: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
    stop_check_interval: int = 16,
    decode: str = "eager",
    compile_prefill: bool = False,
    compile_backend: str = "inductor",
    block_size: int = 64,
    timings: dict | None = None,
) -> list[list[int]]:
    """Continues each prompt (a list of token ids; lengths may differ) by up to max_new_tokens
    tokens and returns the new tokens per prompt, cut after the first eos_token_id.

    Prompts are packed into one varlen prefill (no padding tokens). Caches are allocated for
    (batch, longest prompt + max_new_tokens) the first time and reused while large enough.
    decode: "eager", "compiled" or "cuda_graph" (see DecodeRunner); compile_prefill compiles the
    prefill with a dynamic token count. The host reads the sampled tokens only every
    stop_check_interval steps (and at the end). timings, when given, receives prefill/decode
    seconds and token counts (measuring them synchronises the device)."""
    prompt_lists = _as_prompt_lists(prompts)
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.device
    N = len(prompt_lists)
    lengths = [len(p) for p in prompt_lists]
    needed = max(lengths) + max_new_tokens
    shape = model.cache_shape
    if shape is None or shape[0] < N or shape[1] < needed:
        model.allocate_caches(max(N, shape[0] if shape else 0), max(needed, shape[1] if shape else 0), block_size)
        model.__dict__.pop("_decode_runners", None)
        model.__dict__.pop("_compiled_prefill", None)
    runner = _decode_runner(model, N, decode, compile_backend)
    prefill = _prefill_function(model, compile_prefill, compile_backend)
    slots = runner.slots
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    sampling = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    flat = torch.tensor([t for p in prompt_lists for t in p], dtype=torch.long).to(device)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    model.reset_sequences(slots)
    return sampling_loop(
        lambda: prefill(flat, cu, slots), runner, N, max_new_tokens, device, sampling, eos_token_id,
        stop_check_interval, sum(lengths), timings,
    )


def sampling_loop(
    prefill: Callable[[], Tensor],
    decode_step: Callable[[Tensor], Tensor],
    batch: int,
    max_new_tokens: int,
    device: torch.device,
    sampling: dict,
    eos_token_id: int | None,
    stop_check_interval: int,
    prompt_tokens: int,
    timings: dict | None,
) -> list[list[int]]:
    """Samples the first token from prefill() [batch, vocab] logits, then one token per
    decode_step(tokens) call; reads tokens on the host only every stop_check_interval steps (to
    stop once every row has emitted eos) and at the end. Rows that finished keep emitting eos."""
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    _synchronize(device)
    start = time.perf_counter()
    tokens = sample_tokens(prefill(), **sampling)
    out[:, 0] = tokens
    finished = torch.zeros(batch, dtype=torch.bool, device=device) if eos_token_id is None else tokens == eos_token_id
    _synchronize(device)
    prefill_done = time.perf_counter()
    steps = 1
    for step in range(1, max_new_tokens):
        if step % stop_check_interval == 0 and eos_token_id is not None and bool(finished.all()):
            break
        tokens = sample_tokens(decode_step(tokens), **sampling)
        if eos_token_id is not None:
            tokens = torch.where(finished, eos_token_id, tokens)
            finished = finished | (tokens == eos_token_id)
        out[:, step] = tokens
        steps += 1
    _synchronize(device)
    if timings is not None:
        timings.update(
            prefill_s=prefill_done - start,
            prefill_tokens=prompt_tokens,
            decode_s=time.perf_counter() - prefill_done,
            decode_steps=steps - 1,
            decode_tokens=batch * (steps - 1),
        )
    return [_trim_at_eos(row[:steps], eos_token_id) for row in out.tolist()]
