"""Retrieval for search agents: a corpus, BM25 and dense indexes, and a Search-R1-compatible `/retrieve` server."""
