"""Decode throughput of the reference engine vs HF `generate()` on the same model and batch.

Both sample (temperature 1, no truncation) exactly `--new-tokens` tokens for the same left-padded
prompts, with the same torch thread count, measured alternately in one process. Prints tokens/s of
each and their ratio (target: reference ≥ 1.5× HF).

    python benchmarks/engine_decode.py [--model tiny] [--batch 8] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from agentbench_npu.engines.reference import ReferenceEngine
from agentbench_npu.models import load_model
from agentbench_npu.types import GenerateRequest, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    tok = lm.tokenizer
    engine = ReferenceEngine(lm.model, tok)
    prompts = [tok.encode(f"<|im_start|>user\nWhat is {i} + {3 * i}?" + " Think." * (i % 3) + "<|im_end|>\n"
                          "<|im_start|>assistant\n") for i in range(args.batch)]
    requests = [GenerateRequest(tuple(p), SamplingParams(max_new_tokens=args.new_tokens, seed=i, ignore_eos=True))
                for i, p in enumerate(prompts)]
    width = max(map(len, prompts))
    ids = torch.full((args.batch, width), tok.pad_token_id)
    mask = torch.zeros((args.batch, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1

    def ours() -> None:
        results = engine.generate_batch(requests)
        assert all(len(r.output_ids) == args.new_tokens for r in results)

    @torch.inference_mode()
    def hf() -> None:
        out = lm.model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, do_sample=True, top_k=0, top_p=1.0,
                                temperature=1.0, pad_token_id=tok.pad_token_id)
        assert out.shape[1] == width + args.new_tokens

    for fn in (ours, hf):  # warm up both
        fn()
    times: dict[str, list[float]] = {"reference": [], "hf_generate": []}
    for _ in range(args.repeats):
        for name, fn in (("reference", ours), ("hf_generate", hf)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens = args.batch * args.new_tokens
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"model {lm.path.name}  batch {args.batch}  new tokens {args.new_tokens}  threads {args.threads}")
    print(f"reference engine: {rate['reference']:8.0f} tok/s  (runner {type(engine.runner).__name__})")
    print(f"HF generate():    {rate['hf_generate']:8.0f} tok/s")
    ratio = rate["reference"] / rate["hf_generate"]
    print(f"ratio reference / HF: {ratio:.2f}x  (target >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
