"""Serving what was trained: generation with a KV cache over the layouts training uses.

So far: greedy generation on one device and under tensor parallelism, for meshpar's
Llama and any planned model whose attention runs through a Plan's `attention` cores
(transformers' causal LMs included). Pipelines, sampling, batching of prompts, the
`generate` command and the server are not here yet.
"""
