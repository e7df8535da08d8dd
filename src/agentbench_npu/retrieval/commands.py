"""`agentbench-npu search-server` and `agentbench-npu search-index`: Search-R1's retrieval server, and its index."""

from __future__ import annotations

import time

import click

from .index import RETRIEVERS

_CORPUS = click.option("--corpus", required=True, metavar="FILE",
                       help='Search-R1 corpus JSONL: one {"id": ..., "contents": "\\"Title\\"\\ntext"} per line')
_RETRIEVER = click.option("--retriever", default="bm25", show_default=True, type=click.Choice(RETRIEVERS))
_ENCODER = click.option("--encoder", default="", metavar="DIR",
                        help="dense: a local sentence-encoder directory (default: all-MiniLM-L6-v2, extra 'dense')")
_PREFIXES = click.option("--prefixes", nargs=2, default=("", ""), metavar="QUERY PASSAGE",
                         help="dense: text put before queries and passages, e.g. 'query: ' 'passage: ' for e5")


@click.command("search-server")
@_CORPUS
@click.option("--index", "index_dir", default=None, metavar="DIR",
              help="load the index saved here; build and save it first if the directory is new")
@_RETRIEVER
@_ENCODER
@_PREFIXES
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--topk", default=3, show_default=True, type=click.IntRange(min=1), help="for requests that give none")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="CPU threads per query (torch, faiss): 1 keeps latency steady beside a trainer")
@click.option("--max-topk", default=1000, show_default=True, type=click.IntRange(min=1),
              help="larger requests get a 422")
def search_server(corpus: str, index_dir: str | None, retriever: str, encoder: str, prefixes: tuple[str, str],
                  host: str, port: int, topk: int, threads: int, max_topk: int) -> None:
    """Serve a corpus over Search-R1's API: POST /retrieve, GET /health."""
    import uvicorn

    from .index import open_searcher
    from .server import make_app

    if topk > max_topk:
        raise click.BadParameter(f"--topk {topk} is above --max-topk {max_topk}", param_hint="--topk")
    started = time.perf_counter()
    searcher = open_searcher(corpus, retriever, index_dir, encoder,
                             on_build=lambda: click.echo(f"building the {retriever} index into {index_dir}", err=True),
                             prefixes=prefixes)
    set_threads(threads)  # after a build, which encodes with every core
    click.echo(f"{len(searcher.corpus)} documents ({retriever}) ready in {time.perf_counter() - started:.1f} s; "
               f"POST http://{host}:{port}/retrieve", err=True)
    uvicorn.run(make_app(searcher, default_topk=topk, max_topk=max_topk), host=host, port=port, log_level="warning")


def set_threads(threads: int) -> None:
    """Threads for the query path. Two threads beside a busy core stall at every sync point: one query to the
    dense encoder took 500 ms with 2 threads and 13 ms with 1 while a trainer held the other core."""
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(threads)


@click.command("search-index")
@_CORPUS
@click.option("--index", "index_dir", required=True, metavar="DIR", help="where to save it (replaced atomically)")
@_RETRIEVER
@_ENCODER
@_PREFIXES
def search_index(corpus: str, index_dir: str, retriever: str, encoder: str, prefixes: tuple[str, str]) -> None:
    """Build a retrieval index of a corpus and save it, for `search-server --index`."""
    from .index import build_index

    started = time.perf_counter()
    searcher = build_index(corpus, retriever, index_dir, encoder, prefixes)
    click.echo(f"indexed {len(searcher.corpus)} documents ({retriever}) into {index_dir} in "
               f"{time.perf_counter() - started:.1f} s")
