"""`hf_plan(model)`: a meshpar Plan for a transformers causal LM, read from the split
transformers itself describes in every config.

    base_model_tp_plan    colwise -> column, rowwise -> row,
                          replicated_with_grad_allreduce -> partial_grads (Qwen3's q, k norms),
                          moe_tp_experts -> the plan's experts (Mixtral's and Qwen3-MoE's
                          stacked experts: split by expert parallelism, whole under tp; the
                          entries inside them are not applied; Qwen3-MoE's dense MLPs, where
                          some layers have one, are tp regions by their own names)
    base_model_pp_plan    the embedding (input_ids in: vocab-parallel, first stage), the
                          layer list (the blocks), the final norm (last stage)
    the model's _pp_plan  the output layer (vocab-parallel, with meshpar's loss)
    module types          the attention modules (parents of q_proj...) are the tp regions'
                          and context parallelism's attention; the MLPs the other regions;
                          the base model's rotary embedding runs on every stage

Heads: the query projection is split by whole heads, the key and value projections by
whole KV heads - one replicated on each rank when tp exceeds them (a divisor of tp).
transformers' attention reshapes with -1 heads, so no attribute changes with tp.

Applying it (`meshpar.parallelize`) splits the model; building it switches the model's
attention to meshpar's core through transformers' attention interface
(meshpar/hf/attention.py) - the same causal attention - so that context parallelism and
selective recomputation can replace it.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from meshpar.hf.attention import IMPLEMENTATION, causal_attention, register
from meshpar.parallel.plan import PipelinePlan, Plan

# The families whose forward is the base model's embedding, layers and norm as the pp plan
# lists them, nothing in between (Gemma, say, scales its embeddings inside the forward),
# and whose every strategy is tested against one device (tests/test_hf_models.py).
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe")
STYLES = {"colwise": "column", "rowwise": "row", "replicated_with_grad_allreduce": "partial_grads"}


class UnsupportedModel(ValueError):
    """A transformers model hf_plan cannot split, with what it did not understand."""


def hf_plan(model: nn.Module) -> Plan:
    """The Plan of a transformers causal LM (LlamaForCausalLM, Qwen2ForCausalLM,
    Qwen3ForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM and
    others laid out alike),
    from its config's
    `base_model_tp_plan` and `base_model_pp_plan`; switches its attention to meshpar's
    core and turns its KV cache off (training). UnsupportedModel (a ValueError) names every
    entry or module type it did not understand."""
    config = getattr(model, "config", None)
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if config is None or base is None:
        raise UnsupportedModel(f"{type(model).__name__} is not a transformers causal LM (no config and base model)")
    problems: list[str] = []
    if getattr(config, "model_type", None) not in FAMILIES:
        raise UnsupportedModel(f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r}): "
                               f"meshpar splits the transformers families {', '.join(FAMILIES)}")
    tp_plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    pp_plan = dict(getattr(config, "base_model_pp_plan", None) or {})
    head_plan = dict(getattr(type(model), "_pp_plan", None) or {})  # the instance merges in the base's
    if not tp_plan:
        problems.append(f"{type(config).__name__} has no base_model_tp_plan")
    if not pp_plan:
        problems.append(f"{type(config).__name__} has no base_model_pp_plan")
    if len(head_plan) != 1:
        problems.append(f"{type(model).__name__}._pp_plan should name one output layer, has {sorted(head_plan)}")
    experts = [k for k, v in tp_plan.items() if v == "moe_tp_experts"]
    tp_plan = {k: v for k, v in tp_plan.items() if k not in experts and not k.startswith(tuple(e + "." for e in experts))}
    if len(experts) > 1:
        problems.append(f"several experts entries in base_model_tp_plan: {experts} (meshpar takes one)")
    if experts and getattr(config, "output_router_logits", False):
        problems.append("output_router_logits=True asks for transformers' load-balancing loss, which meshpar "
                        "does not apply to a transformers model yet (it computes the loss from the logits); "
                        "set it False to train without one")
    if getattr(config, "router_jitter_noise", 0.0):
        problems.append(f"router_jitter_noise={config.router_jitter_noise} (random per rank: layouts would differ)")
    unknown = {k: v for k, v in tp_plan.items() if v not in STYLES}
    if unknown:
        problems.append(f"tp plan styles meshpar does not apply: {unknown} (it applies {', '.join(STYLES)})")
    if getattr(config, "attention_dropout", 0.0):
        problems.append(f"attention_dropout={config.attention_dropout} (meshpar's attention core has none)")
    if problems:
        raise UnsupportedModel(f"{type(model).__name__}: " + "; ".join(problems))

    names = dict(model.named_modules())
    full = {f"{prefix}.{pattern}": style for pattern, style in tp_plan.items()}
    by_style = {s: [p for p, style in full.items() if STYLES[style] == s] for s in set(STYLES.values())}
    embed, blocks, after = _pipeline_parts(pp_plan, base, prefix, problems)
    output = next(iter(head_plan))
    for pattern in list(by_style["column"] + by_style["row"]):
        found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not found and experts:  # Qwen3-MoE's dense MLP entries, where every layer is sparse
            by_style["column" if pattern in by_style["column"] else "row"].remove(pattern)
            continue
        if not found:
            problems.append(f"tp plan entry {pattern!r} matches no module")
        problems += [f"{n} is a {type(names[n]).__name__}, not an nn.Linear" for n in found
                     if not isinstance(names[n], nn.Linear)]
    if not isinstance(names.get(output), nn.Linear):
        problems.append(f"the output layer {output!r} is not an nn.Linear")
    if embed and not isinstance(names.get(embed), nn.Embedding):
        problems.append(f"the embedding {embed!r} is not an nn.Embedding")
    rotary = next((n for n, m in base.named_children() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if rotary is None:
        problems.append(f"{type(base).__name__} has no rotary embedding module (meshpar passes each layer "
                        f"its position embeddings)")
    regions = sorted({p.rpartition(".")[0] for p in by_style["column"] + by_style["row"]})
    attention = [r for r in regions if any(p.startswith(r + ".") and p.endswith(("q_proj", "k_proj"))
                                          for p in by_style["column"])]
    if len(attention) != 1:
        problems.append(f"found {len(attention)} attention modules among the tp plan's parents {regions} "
                        f"(meshpar looks for the one holding q_proj and k_proj)")
    if experts:  # a dense MLP's region names its own modules: a sparse block of the same name is no region
        regions = attention + sorted({n.rpartition(".")[0] for p in by_style["column"] + by_style["row"]
                                      if not p.rpartition(".")[0] in attention
                                      for n in names if fnmatch.fnmatchcase(n, p)})
    if problems:
        raise UnsupportedModel(f"{type(model).__name__}: " + "; ".join(problems))

    register()
    model.set_attn_implementation(IMPLEMENTATION)
    config.use_cache = False  # training: a forward keeps no KV cache (Hub configs ask for one)
    for name, module in names.items():
        if fnmatch.fnmatchcase(name, attention[0]):
            module.attend = causal_attention
    heads = {pattern: config.num_attention_heads for pattern in by_style["column"] if pattern.endswith("q_proj")}
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    heads.update({pattern: kv_heads for pattern in by_style["column"] if pattern.endswith(("k_proj", "v_proj"))})
    rotary_name = f"{prefix}.{rotary}"
    return Plan(column=by_style["column"], row=by_style["row"], heads=heads, partial_grads=by_style["partial_grads"],
                vocab_embedding=[embed], vocab_output=output, blocks=blocks, tp_regions=regions,
                attention=attention[0], positions="position_ids", positions_batched=True,
                experts=f"{prefix}.{experts[0]}" if experts else None,
                pipeline=PipelinePlan(blocks=blocks, first=[embed], last=[*after, output], every_stage=[rotary_name],
                                      embed=_embedding(embed), head=_head([*after, output]),
                                      hidden_size=config.hidden_size, block_args=_layer_arguments(rotary_name)))


def _pipeline_parts(pp_plan: dict, base: nn.Module, prefix: str, problems: list[str]):
    """(embedding, layer list, [modules after the layers]) by their full names, from
    base_model_pp_plan: the entry taking input_ids, the ModuleList, and what follows it."""
    embed = next((k for k, (inputs, _) in pp_plan.items() if "input_ids" in inputs), None)
    lists = [k for k in pp_plan if isinstance(getattr(base, k, None), nn.ModuleList)]
    if embed is None:
        problems.append(f"base_model_pp_plan has no entry taking input_ids: {sorted(pp_plan)}")
    if len(lists) != 1:
        problems.append(f"base_model_pp_plan should hold one layer list, has {lists}")
        return None, None, []
    order = list(pp_plan)
    if embed is not None and order.index(embed) > order.index(lists[0]):
        problems.append("base_model_pp_plan lists the embedding after the layers")
    missing = [k for k in order if not hasattr(base, k)]
    if missing:
        problems.append(f"base_model_pp_plan names modules the model lacks: {missing}")
    return (f"{prefix}.{embed}" if embed else None, f"{prefix}.{lists[0]}",
            [f"{prefix}.{k}" for k in order[order.index(lists[0]) + 1:]])


def _embedding(name: str):
    def embed(stages: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return stages.get_submodule(name)(tokens)
    return embed


def _head(names: list[str]):
    def head(stages: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        for name in names:
            hidden = stages.get_submodule(name)(hidden)
        return hidden
    return head


def _layer_arguments(rotary: str):
    """A decoder layer's keyword arguments from the tokens' positions: the rotary
    embedding's (cos, sin) - computed in fp32, as the whole model computes them from its
    fp32 embeddings - and no mask (causal attention, meshpar/hf/attention.py)."""
    def arguments(stages: nn.Module, positions: torch.Tensor) -> dict:
        position_ids = positions if positions.dim() == 2 else positions.unsqueeze(0)
        like = torch.empty(0, device=positions.device)
        return {"position_embeddings": stages.get_submodule(rotary)(like, position_ids),
                "position_ids": position_ids, "attention_mask": None}
    return arguments
