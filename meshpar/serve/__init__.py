"""Serving what was trained: generation with a KV cache over the layouts training uses.

So far: generation - greedy or sampled from a seed - on one device and under tensor
parallelism, for meshpar's Llama and any planned model whose attention runs through a
Plan's `attention` cores (transformers' causal LMs included), and the `meshpar generate`
command. Pipelines, batching of prompts and the server are not here yet.
"""
