"""Zero-bubble's backward split at the linear layers (meshpar/pipeline/weight_grads.py),
counted on one process: I and W together do exactly one backward's FLOPs and give its
gradients bit for bit, W does exactly the linear layers' weight products, every gradient
hook fires once, and after I the micro-batch holds only what W needs. The pipelines that
run it equal one device in tests/test_pipeline_parallel.py, test_zero.py and test_api.py."""

import copy
import weakref

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from meshpar.model.config import model_config
from meshpar.model.llama import build_model
from meshpar.parallel.precision import autocast
from meshpar.parallel.recompute import recompute_modules
from meshpar.pipeline.weight_grads import DeferredWeightGrads

BATCH, SEQ = 2, 32


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_hook_calls(model: nn.Module) -> dict[str, int]:
    calls = dict.fromkeys((name for name, _ in model.named_parameters()), 0)
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


@pytest.mark.parametrize("precision, recompute", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_input_and_weight_passes_do_one_backwards_work(precision, recompute):
    """With recomputation the layers run again in I, their linear layers routed as in
    the forward. One product more then: checkpoint stops recomputing once the last saved
    tensor is back, which in one backward is the input of a layer's last linear
    (w_down), before its matmul; a routed linear saves its input only once its forward
    has run."""
    cfg = model_config("tiny")
    reference = build_model(cfg, seed=0)
    model = copy.deepcopy(reference)
    if recompute:
        recompute_modules(list(reference.layers) + list(model.layers))
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    def loss_of(m: nn.Module) -> torch.Tensor:
        with autocast(precision, torch.device("cpu"), cache=False):
            return m(tokens).float().square().mean()

    backward_flops = flops(loss_of(reference).backward)

    store = DeferredWeightGrads(model)
    calls = count_hook_calls(model)
    saved = []  # every tensor the forward saves for backward, weakly
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(weakref.ref(t)), t)[1], lambda t: t):
        with store.recording():
            loss = loss_of(model)
    assert torch.equal(loss, loss_of(reference))

    def input_pass():
        with store.input_pass((0, 0)):
            loss.backward()
    input_flops = flops(input_pass)

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    deferred = {name for name, p in model.named_parameters() if any(p is m.weight for m in linears)}
    assert deferred and all(calls[n] == (0 if n in deferred else 1) for n in calls), calls
    # The graph is gone: what the forward saved and is still alive is held for W (or a
    # parameter or buffer, which live anyway).
    held = {t.untyped_storage().data_ptr() for t in store.held_tensors()}
    lasting = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), tokens]}
    alive = [ref() for ref in saved if ref() is not None]
    assert alive and [tuple(t.shape) for t in alive if t.untyped_storage().data_ptr() not in held | lasting] == []

    weight_flops = flops(lambda: store.weight_pass((0, 0)))
    assert all(n == 1 for n in calls.values()), calls
    tokens_in = BATCH * SEQ
    extra = sum(2 * tokens_in * layer.mlp.w_down.in_features * layer.mlp.w_down.out_features
                for layer in model.layers) if recompute else 0
    assert input_flops + weight_flops == backward_flops + extra
    assert weight_flops == sum(2 * tokens_in * m.in_features * m.out_features for m in linears)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_generic_split_walks_the_graph_twice():
    """What the split at the linear layers replaces, for contrast: I as autograd.grad with
    respect to the stage input, W as a backward restricted to the parameters, which
    computes the input gradients once more."""
    cfg = model_config("tiny")
    model = build_model(cfg, seed=0)
    hidden = torch.randn(BATCH, SEQ, cfg.hidden_size, requires_grad=True)
    layers = nn.Sequential(*model.layers)  # a middle stage: hidden in, hidden out
    cos, sin = model.rope_cos[:SEQ], model.rope_sin[:SEQ]

    def stage():
        x = hidden
        for layer in layers:
            x = layer(x, cos, sin)
        return x.square().mean()

    backward_flops = flops(stage().backward)
    out = stage()
    input_flops = flops(lambda: torch.autograd.grad(out, [hidden], retain_graph=True))
    weight_flops = flops(lambda: torch.autograd.backward(out, inputs=list(layers.parameters())))
    assert input_flops + weight_flops > backward_flops
    assert weight_flops == backward_flops  # W alone costs a whole backward

    store = DeferredWeightGrads(layers)
    with store.recording():
        out = stage()

    def input_pass():
        with store.input_pass((1, 0)):
            out.backward()
    assert flops(input_pass) + flops(lambda: store.weight_pass((1, 0))) == backward_flops
