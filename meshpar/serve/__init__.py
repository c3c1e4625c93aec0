"""Serving what was trained: generation with a KV cache over the layouts training uses.

For meshpar's Llama and any planned model whose attention runs through a Plan's
`attention` cores (transformers' causal LMs included), on one device or split over tp x
pp ranks: `generate.py` from Python, `engine.py` the per-rank engine (batches, pipeline
groups, the driver and its followers), `server.py` the OpenAI-compatible HTTP server,
`commands.py` `meshpar generate` and `meshpar serve`.
"""
