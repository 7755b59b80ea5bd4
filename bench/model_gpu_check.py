"""GPU check of the Kimi-Linear model (small preset, bf16): prefill + decode vs full forward,
compiled decode (reduce-overhead) without cudagraph skips, manual CUDA-graph decode vs eager."""

import torch
from torch._dynamo.utils import counters

from kda_ops import KimiLinearConfig, KimiLinearForCausalLM


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig.preset("small"), dtype=torch.bfloat16).init_weights(0).cuda().eval()
    ref32 = KimiLinearForCausalLM(KimiLinearConfig.preset("small"), dtype=torch.float32).init_weights(0).cuda().eval()
    lengths = [37, 300, 5, 129]
    seqs = [torch.randint(0, 1024, (n + 8,), device="cuda") for n in lengths]
    model.allocate_caches(4, 512)
    slots = torch.arange(4, device="cuda")
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    with torch.no_grad():
        model.reset_sequences(slots)
        pre = model.prefill(torch.cat([s[:n] for s, n in zip(seqs, lengths)]), cu, slots, all_logits=True)
        steps = [model.decode_step(torch.stack([s[n + t] for s, n in zip(seqs, lengths)]), slots) for t in range(8)]
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            full = model(s[None])[0]
            full32 = ref32(s[None])[0]
            dec = torch.stack([st[i] for st in steps])
            print(f"seq {i} len {n}: prefill vs forward rel {rel(pre[cu[i]:cu[i+1]], full[:n]):.2e}, "
                  f"decode vs forward rel {rel(dec, full[n:]):.2e}, bf16 forward vs fp32 rel {rel(full, full32):.2e}")
    counters.clear()
    tm = {}
    eager = model.generate([s[:n].tolist() for s, n in zip(seqs, lengths)], 200, greedy=True, timings=tm)
    print("eager", tm)
    for mode in ("cuda_graph", "compiled"):
        try:
            model.generate([s[:n].tolist() for s, n in zip(seqs, lengths)], 200, greedy=True, decode=mode)
        except Exception as error:
            print(mode, "FAILED", type(error).__name__, str(error)[:600])
            continue
        tm = {}
        out = model.generate([s[:n].tolist() for s, n in zip(seqs, lengths)], 200, greedy=True, decode=mode, timings=tm)
        same = sum(a == b for a, b in zip(out, eager))
        print(mode, tm, f"sequences equal to eager: {same}/4", "cudagraph_skips", counters["inductor"]["cudagraph_skips"])


if __name__ == "__main__":
    main()
