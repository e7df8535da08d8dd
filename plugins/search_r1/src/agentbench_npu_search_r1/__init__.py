"""Search-R1 and a search agent: retrieval-augmented RL over a real retrieval server."""
