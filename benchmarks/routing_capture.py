"""What routed-expert capture (the rollout side of R3) and replay (the training side) cost on an MoE model.

Rollout: the reference engine decodes the same requests with and without `return_routed_experts`, alternately in
one process. Training: the trainer's log-prob pass over the same batch with and without replay. Prints the
median seconds of each and the ratios (target, after the published figure for R3: capture adds < 3% to rollout).

    python benchmarks/routing_capture.py [--model tiny-moe] [--batch 32] [--new-tokens 48] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from agentbench_npu.engines.reference import ReferenceEngine
from agentbench_npu.models import load_model
from agentbench_npu.training.batch import pack
from agentbench_npu.training.trainer import TrainConfig, Trainer
from agentbench_npu.types import GenerateRequest, SamplingParams, Trajectory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-moe")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    tok = lm.tokenizer
    engine = ReferenceEngine(lm.model, tok)
    if engine.moe is None:
        raise SystemExit(f"model '{args.model}' is dense: nothing is routed")
    prompts = [tok.encode(f"<|im_start|>user\nWhat is {i} + {3 * i}?<|im_end|>\n<|im_start|>assistant\n")
               for i in range(args.batch)]

    def requests(capture: bool) -> list[GenerateRequest]:
        return [GenerateRequest(tuple(p), SamplingParams(max_new_tokens=args.new_tokens, seed=i, ignore_eos=True),
                                return_routed_experts=capture) for i, p in enumerate(prompts)]

    plain, captured = requests(False), requests(True)
    results = engine.generate_batch(captured)
    trajs = []
    for i, (p, r) in enumerate(zip(prompts, results)):
        t = Trajectory(prompt_ids=list(p), task_id=str(i), reward=float(i % 2), group=i // 4)
        t.append_model_tokens(r.output_ids, r.output_logprobs, r.routed_experts)
        trajs.append(t)
    trainer = Trainer(lm.model, TrainConfig(routing_replay=True), torch.device("cpu"), tok.pad_token_id)
    batch = pack(trajs, [0.0] * len(trajs), tok.pad_token_id, torch.device("cpu"))

    cases = {
        "rollout": lambda: engine.generate_batch(plain),
        "rollout + capture": lambda: engine.generate_batch(captured),
        "log-probs": lambda: trainer.recompute_logprobs(batch, replay=False),
        "log-probs + replay": lambda: trainer.recompute_logprobs(batch, replay=True),
    }
    for fn in cases.values():  # warm up
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():  # alternate, so drift hits every case alike
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    tokens = args.batch * args.new_tokens
    print(f"model {args.model}: {engine.moe.num_experts} experts, top-{engine.moe.top_k}, "
          f"{len(engine.moe.moe_layers)} MoE layers; batch {args.batch} x {args.new_tokens} new tokens; "
          f"{args.repeats} repeats, {args.threads} threads")
    for name, seconds in median.items():
        print(f"  {name:<20} {seconds * 1000:8.1f} ms" + (f"   ({tokens / seconds:,.0f} tokens/s)" if "rollout" in name else ""))
    print(f"capture overhead: {median['rollout + capture'] / median['rollout']:.3f}x rollout time (target < 1.03)")
    print(f"replay overhead:  {median['log-probs + replay'] / median['log-probs']:.3f}x log-prob pass time")


if __name__ == "__main__":
    main()
