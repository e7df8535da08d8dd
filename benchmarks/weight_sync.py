"""Weight-sync throughput against the raw operation underneath it, measured side by side in one run.

colocate:    ColocateSync's copy into the engine vs one memcpy (`copy_`) of the same bytes; and the whole
             verified sync (copy + checksums on both sides) for information.
distributed: send_weights/receive_weights (bucketed broadcast over a gloo group of 2 processes) vs a raw
             gloo broadcast of one buffer of the same bytes.
Targets: each transfer >= 0.5x its reference.

    python benchmarks/weight_sync.py [--hidden 512] [--layers 8] [--bucket-mb 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from agentbench_npu.engines.reference import ReferenceEngine
from agentbench_npu.models.tokenizer import build_tokenizer
from agentbench_npu.sync import ColocateSync
from agentbench_npu.sync.distributed import BucketBuffers, open_group, receive_weights, send_weights, weight_specs


def build_model(hidden: int, layers: int) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=hidden // 8, intermediate_size=3 * hidden,
                         tie_word_embeddings=False)
    return Qwen3ForCausalLM(config).eval()


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def colocate(model: torch.nn.Module, repeats: int) -> None:
    engine = ReferenceEngine(copy.deepcopy(model).requires_grad_(False), build_tokenizer())
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t_copy = median_seconds(lambda: engine.update_weights_from_tensors(named), repeats)
    t_memcpy = median_seconds(lambda: dst.copy_(src), repeats)
    t_verified = median_seconds(lambda: ColocateSync().push(model, engine), repeats)
    print(f"colocate: {nbytes / 1e6:.0f} MB in {len(named)} tensors")
    print(f"  sync copy   {nbytes / t_copy / 1e9:6.2f} GB/s   memcpy {nbytes / t_memcpy / 1e9:6.2f} GB/s   "
          f"ratio {t_memcpy / t_copy:.2f}x (target >= 0.5x: {'met' if t_memcpy / t_copy >= 0.5 else 'NOT met'})")
    print(f"  verified sync (copy + both checksums) {nbytes / t_verified / 1e9:6.2f} GB/s   "
          f"ratio {t_memcpy / t_verified:.2f}x of memcpy (information)")


def _distributed_rank(rank: int, port: int, specs, named, bucket: int, repeats: int, out) -> None:
    torch.set_num_threads(1)
    group = open_group("127.0.0.1", port, rank=rank, world_size=2)
    flat = torch.cat([t.reshape(-1) for _, t in named]) if rank == 0 else torch.empty(
        sum(t.numel() for _, t in named))
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0

    buffers = BucketBuffers(specs, bucket)

    def ours() -> None:
        if rank == 0:
            send_weights(group, named, buffers)
        else:
            receive_weights(group, buffers)

    def raw() -> None:
        group.broadcast([flat], opts).wait()

    t_ours = median_seconds(ours, repeats)
    t_raw = median_seconds(raw, repeats)
    if rank == 0:
        out.put((t_ours, t_raw))


def distributed(model: torch.nn.Module, bucket_mb: int, repeats: int) -> None:
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_distributed_rank,
                         args=(r, port, weight_specs(named), named, bucket_mb << 20, repeats, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    t_ours, t_raw = out.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    ratio = t_raw / t_ours
    print(f"distributed (gloo, 2 processes, {bucket_mb} MB buckets): {nbytes / 1e6:.0f} MB")
    print(f"  send/receive {nbytes / t_ours / 1e9:6.2f} GB/s   raw broadcast {nbytes / t_raw / 1e9:6.2f} GB/s   "
          f"ratio {ratio:.2f}x (target >= 0.5x: {'met' if ratio >= 0.5 else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = build_model(args.hidden, args.layers)
    colocate(model, args.repeats)
    distributed(model, args.bucket_mb, args.repeats)


if __name__ == "__main__":
    main()
