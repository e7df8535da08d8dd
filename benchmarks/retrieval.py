"""Retrieval server latency and throughput over loopback HTTP against the in-process search, side by side in one run.

corpus:      `--docs` generated Wikipedia-like passages (a title, ~80 words), deterministic from `--seed`;
             queries are Search-R1-style questions about random documents.
server:      `agentbench-npu search-server --index DIR` in its own process (as a trainer would run it), loading
             the index this script built; the reference is `searcher.search` on that index in this process,
             with no HTTP at all, so each ratio is the cost of HTTP + JSON + the server's threadpool.
latency:     p50/p99 of one query per request (topk 3), one request after another, interleaved with the reference.
throughput:  queries per second with `--concurrency` clients (one query per request) vs as many threads calling
             the searcher; `4 x --requests` queries in all.
batch:       one request carrying 256 queries (median of 5) vs one `searcher.search` of the same 256.
Target: BM25 /retrieve p50 <= 5 ms.

`--threads N` sets OMP_NUM_THREADS/MKL_NUM_THREADS for this process and the server (torch's and faiss' thread
pools); on a machine whose cores are busy with other work, fewer threads than cores can be many times faster.
`--workdir DIR` keeps the corpus and indexes there, so a second run loads the dense index instead of re-encoding.

    python benchmarks/retrieval.py [--docs 10000] [--requests 200] [--concurrency 16] [--retrievers bm25,dense]
                                   [--threads N] [--workdir DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from agentbench_npu.retrieval.index import open_searcher

TOPK, BATCH, BATCH_REPEATS, TARGET_P50_MS = 3, 256, 5, 5.0
SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ri", "so", "tu", "va", "ze", "bra", "cho", "dri", "fen", "gal", "hor",
             "isk", "jun", "kel", "mar", "nor", "ost", "pal", "quin", "rus"]
KINDS = ["town", "river", "composer", "mountain", "novel", "football club", "painter", "island", "ship", "dynasty"]
REGIONS = ["the northern highlands", "the eastern coast", "the river delta", "the southern plains", "the old duchy",
           "the western islands", "the central valley", "the border marches"]
EVENTS = ["founded", "first recorded", "rebuilt", "renamed", "surveyed", "celebrated", "described", "mapped"]
FILLER = ["The region is known for its {a} {n} and its {a} {n}.",
          "Historians note that the {n} of the area changed little over the following {k} decades.",
          "Local records describe a {a} {n} held every spring near the old {n}.",
          "In later years the {n} became a centre of {n} and {n}.",
          "A {a} {n} built nearby still attracts visitors interested in {n}."]
ADJECTIVES = ["small", "ancient", "famous", "quiet", "wealthy", "remote", "celebrated", "modest", "busy", "coastal"]
NOUNS = ["market", "harbour", "festival", "bridge", "library", "trade", "weaving", "fishing", "music", "chapel",
         "mill", "school", "garden", "fortress", "vineyard", "railway", "theatre", "monastery", "mine", "orchard"]


def generate(docs: int, seed: int) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The corpus in Search-R1's layout, and (question, id of the document it is about) for every document."""
    rng, seen, rows, questions = random.Random(seed), set(), [], []
    while len(seen) < docs:
        seen.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).title())
    names = sorted(seen)
    rng.shuffle(names)
    draw = {"a": ADJECTIVES, "n": NOUNS, "k": [str(k) for k in range(2, 10)]}
    for i, name in enumerate(names):
        kind, region, event = rng.choice(KINDS), rng.choice(REGIONS), rng.choice(EVENTS)
        year, person = rng.randint(1200, 1990), f"{rng.choice(names)} {rng.choice(names)}"
        filler = " ".join(re.sub(r"\{(\w)\}", lambda m: rng.choice(draw[m.group(1)]), rng.choice(FILLER))
                          for _ in range(4))
        text = (f"{name} is a {rng.choice(ADJECTIVES)} {kind} in {region}. It was {event} in {year} by {person}. "
                f"{filler}")
        rows.append({"id": str(i), "contents": f'"{name} ({kind})"\n{text}'})
        questions.append((rng.choice([f"when was the {kind} {name} {event}?", f"who {event} {name}?",
                                      f"where is the {kind} {name}?"]), str(i)))
    return rows, questions


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@contextmanager
def encoding_progress() -> Iterator[None]:
    """Print progress while the dense retriever encodes the corpus (it encodes in one call, silently)."""
    from agentbench_npu.retrieval import dense

    original = dense.Encoder.encode

    def encode(self, texts, batch_size: int = 64):
        import numpy as np

        if len(texts) <= 2 * BATCH:  # queries, not the corpus
            return original(self, texts, batch_size)
        started, parts, step = time.perf_counter(), [], 1024
        for start in range(0, len(texts), step):
            parts.append(original(self, texts[start:start + step], batch_size))
            done = min(start + step, len(texts))
            print(f"  encoded {done}/{len(texts)} passages in {time.perf_counter() - started:.0f} s", flush=True)
        return np.concatenate(parts)

    dense.Encoder.encode = encode
    try:
        yield
    finally:
        dense.Encoder.encode = original


@contextmanager
def server_process(corpus: Path, index: Path, kind: str) -> Iterator[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agentbench_npu", "search-server", "--corpus", str(corpus),
                                 "--index", str(index), "--retriever", kind, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
        try:
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"search-server did not come up: {log.read()}")
                try:
                    if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)  # polling interval
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def ids(rows: list) -> list[list[str]]:
    return [[item["document"]["id"] if "document" in item else item["id"] for item in row] for row in rows]


async def http_qps(url: str, queries: list[str], concurrency: int) -> float:
    pending = list(reversed(queries))

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while pending:
                response = await http.post("/retrieve", json={"queries": [pending.pop()], "topk": TOPK})
                assert response.status_code == 200, response.text

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(queries) / (time.perf_counter() - started)


def measure(kind: str, corpus: Path, workdir: Path, questions: list[tuple[str, str]], requests: int,
            concurrency: int, rng: random.Random) -> dict[str, Any]:
    started = time.perf_counter()
    print(f"{kind}: opening the index of {len(questions)} documents ...", flush=True)
    with encoding_progress():
        searcher = open_searcher(corpus, kind, workdir / f"index-{kind}",
                                 on_build=lambda: print(f"{kind}: building it", flush=True))
    print(f"{kind}: ready in {time.perf_counter() - started:.1f} s; starting search-server", flush=True)
    sample = [rng.choice(questions) for _ in range(max(4 * requests, BATCH))]
    with server_process(corpus, workdir / f"index-{kind}", kind) as url, httpx.Client(base_url=url,
                                                                                      timeout=60) as http:
        def over_http(batch: list[str]) -> list:
            response = http.post("/retrieve", json={"queries": batch, "topk": TOPK, "return_scores": True})
            assert response.status_code == 200, response.text
            return response.json()["result"]

        def in_process(batch: list[str]) -> list:
            return [[doc for doc, _ in row] for row in searcher.search(batch, TOPK)]

        for question, _ in sample[:10]:  # warm both paths
            over_http([question])
            in_process([question])
        http_ms, local_ms, same, hits = [], [], 0, 0
        for question, answer in sample[:requests]:  # interleaved, so both see the same machine
            t0 = time.perf_counter()
            remote = over_http([question])
            t1 = time.perf_counter()
            local = in_process([question])
            t2 = time.perf_counter()
            http_ms.append((t1 - t0) * 1e3)
            local_ms.append((t2 - t1) * 1e3)
            same += ids(remote) == ids(local)
            hits += answer in ids(remote)[0]
        print(f"{kind}: latency measured; throughput at concurrency {concurrency} ...", flush=True)
        qps_queries = [q for q, _ in sample[:4 * requests]]
        http_rate = asyncio.run(http_qps(url, qps_queries, concurrency))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda q: searcher.search([q], TOPK), qps_queries))
        local_rate = len(qps_queries) / (time.perf_counter() - t0)
        batch = [q for q, _ in sample[:BATCH]]
        http_batch, local_batch = [], []
        for _ in range(BATCH_REPEATS):
            t0 = time.perf_counter()
            remote = over_http(batch)
            t1 = time.perf_counter()
            local = in_process(batch)
            t2 = time.perf_counter()
            http_batch.append((t1 - t0) * 1e3)
            local_batch.append((t2 - t1) * 1e3)
        batch_same = ids(remote) == ids(local)
    return {"kind": kind, "http": (percentile(http_ms, 50), percentile(http_ms, 99), http_rate,
                                   statistics.median(http_batch)),
            "local": (percentile(local_ms, 50), percentile(local_ms, 99), local_rate, statistics.median(local_batch)),
            "same": same, "requests": requests, "hits": hits, "batch_same": batch_same}


def report(results: list[dict[str, Any]], concurrency: int) -> None:
    print()
    print(f"{'retriever':<10}{'path':<13}{'p50 ms':>9}{'p99 ms':>9}{f'QPS @{concurrency}':>11}"
          f"{f'batch {BATCH} ms':>15}")
    for r in results:
        for path, label in (("http", "/retrieve"), ("local", "in-process")):
            p50, p99, qps, batch = r[path]
            print(f"{r['kind']:<10}{label:<13}{p50:9.2f}{p99:9.2f}{qps:11.0f}{batch:15.1f}")
    print()
    for r in results:
        (h50, h99, hq, hb), (l50, l99, lq, lb) = r["http"], r["local"]
        print(f"{r['kind']}: /retrieve vs in-process  p50 {h50 / l50:.2f}x (+{h50 - l50:.2f} ms)  "
              f"p99 {h99 / l99:.2f}x  QPS {hq / lq:.2f}x  batch {hb / lb:.2f}x (+{hb - lb:.1f} ms)")
        print(f"{r['kind']}: same results over HTTP {r['same']}/{r['requests']} single, batch "
              f"{'yes' if r['batch_same'] else 'NO'};  answer in top {TOPK}: {r['hits']}/{r['requests']}")
    for r in results:
        if r["kind"] == "bm25":
            p50 = r["http"][0]
            print(f"target: BM25 /retrieve p50 <= {TARGET_P50_MS:g} ms: {p50:.2f} ms "
                  f"{'PASS' if p50 <= TARGET_P50_MS else 'MISS'}")


def main(docs: int, requests: int, concurrency: int, retrievers: list[str], seed: int, threads: int,
         workdir: str) -> None:
    if threads:  # before torch or faiss is imported here, and inherited by the server
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    rows, questions = generate(docs, seed)
    rng = random.Random(seed + 1)
    with tempfile.TemporaryDirectory(prefix="retrieval-bench-") as tmp:
        where = Path(workdir or tmp) / f"docs{docs}-seed{seed}"
        where.mkdir(parents=True, exist_ok=True)
        corpus = where / "corpus.jsonl"
        text = "".join(json.dumps(row) + "\n" for row in rows)
        if not corpus.is_file() or corpus.read_text(encoding="utf-8") != text:
            corpus.write_text(text, encoding="utf-8")
        words = statistics.mean(len(row["contents"].split()) for row in rows)
        print(f"corpus: {docs} passages, {words:.0f} words on average, {corpus.stat().st_size / 1e6:.1f} MB; "
              f"{requests} requests, concurrency {concurrency}; threads {threads or 'library default'} "
              f"on {os.cpu_count()} CPUs", flush=True)
        results = [measure(kind, corpus, where, questions, requests, concurrency, rng) for kind in retrievers]
    report(results, concurrency)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=10000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--retrievers", default="bm25,dense", help="comma-separated: bm25, dense")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="OMP/MKL threads (default: the libraries' choice)")
    parser.add_argument("--workdir", default="", help="keep the corpus and indexes here (default: a temp dir)")
    args = parser.parse_args()
    main(args.docs, args.requests, args.concurrency, [k.strip() for k in args.retrievers.split(",") if k.strip()],
         args.seed, args.threads, args.workdir)
