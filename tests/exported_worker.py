"""Runs in a fresh process for tests/test_export.py: loads an export directory with
kda_ops.load_exported and writes what the tests compare with eager (torch.save of a dict).

usage: python exported_worker.py EXPORT_DIR REQUEST_JSON OUT_FILE

REQUEST_JSON: {"use_aoti": bool, "logit_prompts": [[ids]], "decode_steps": int,
               "generate_prompts": [[ids]], "max_new_tokens": int}
OUT_FILE gets {"logits": [[prefill logits, decode-step logits ...] per logit prompt] (greedy
continuation), "tokens": generate(generate_prompts, max_new_tokens, greedy=True)}.
"""

import json
import sys


def main(directory: str, request_path: str, out_path: str) -> None:
    import torch

    from kda_ops import load_exported

    with open(request_path) as f:
        request = json.load(f)
    exported = load_exported(directory, use_aoti=request["use_aoti"])
    logits = []
    for prompt in request["logit_prompts"]:
        steps = [exported.prefill([prompt])]
        for _ in range(request["decode_steps"]):
            steps.append(exported.decode_step(steps[-1].argmax(-1)))
        logits.append(steps)
    tokens = exported.generate(request["generate_prompts"], request["max_new_tokens"], greedy=True)
    torch.save(dict(logits=logits, tokens=tokens), out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
