"""The one interpreter: executes any Schedule's actions on this rank, in order.

Consecutive communication actions go out together as one batch of point-to-point
operations; sends are waited for at the end of the step, receives before the compute that
needs them. Gradients accumulate in the parameters across micro-batches. The runtime also
measures what the simulator predicts: the micro-batches whose saved activations are alive
(through saved_tensors_hooks), and the time spent waiting on receives.
"""

from __future__ import annotations

import time
import weakref
from typing import Callable

import torch

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.pipeline.actions import Action, Schedule
from meshpar.pipeline.split import PipelineChunks


class _Saved:
    """Wraps one tensor autograd keeps; alive exactly as long as autograd holds it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class PipelineRuntime:
    def __init__(self, schedule: Schedule, chunks: PipelineChunks, mesh: ParallelMesh,
                 loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 hidden_shape: tuple[int, ...], device: torch.device, measure_activations: bool = True):
        self.schedule, self.chunks, self.mesh = schedule, chunks, mesh
        self.loss_sum, self.hidden_shape, self.device = loss_sum, hidden_shape, device
        self.rank = mesh.index("pp")
        self.actions = schedule.actions[self.rank]
        self.pp_ranks = mesh.ranks("pp")  # global rank of each pipeline rank
        self.params = [p for p in chunks.parameters() if p.requires_grad]
        self.measure_activations = measure_activations  # costs a hook call per saved tensor
        self.peak_live_microbatches = 0
        self.recv_wait_s = 0.0

    # --- helpers ----------------------------------------------------------------------

    def _peer(self, stage: int) -> int:
        return self.pp_ranks[self.schedule.rank_of(stage)]

    def _tag(self, stage: int, mb: int, backward: bool) -> int:
        return (stage * self.schedule.num_microbatches + mb) * 2 + int(backward)

    def _live_microbatches(self) -> int:
        return sum(1 for saved in self.saved.values() if len(saved))

    # --- the step -----------------------------------------------------------------------

    def run(self, inputs: list[torch.Tensor], targets: list[torch.Tensor], num_tokens: int,
            actions: tuple[Action, ...] | None = None) -> torch.Tensor:
        """Execute this rank's actions for one step; returns the summed loss of the
        micro-batches whose last stage is here (zero elsewhere), divided by num_tokens."""
        actions = self.actions if actions is None else actions
        self.stage_in, self.stage_out, self.grad_in, self.grad_out = {}, {}, {}, {}
        self.saved: dict[tuple[int, int], weakref.WeakSet] = {}
        self.inputs, self.targets, self.num_tokens = inputs, targets, num_tokens
        self.loss = torch.zeros((), device=self.device)
        self.pending_sends = []
        i = 0
        while i < len(actions):
            if actions[i].is_compute:
                self._compute(actions[i])
                i += 1
            else:
                j = i
                while j < len(actions) and not actions[j].is_compute:
                    j += 1
                self._communicate(actions[i:j])
                i = j
        for work in self.pending_sends:
            work.wait()
        self.pending_sends.clear()
        return self.loss

    def _compute(self, a: Action):
        key = (a.stage, a.microbatch)
        if a.kind == "F":
            self._forward(a.stage, a.microbatch)
        elif a.kind == "B":
            self._backward(key, inputs_only=False)
            self._release(key)
        elif a.kind == "I":
            self._backward(key, inputs_only=True)
        elif a.kind == "W":
            out = self.stage_out[key]
            torch.autograd.backward(out, self.grad_out.get(key), inputs=self._stage_params(a.stage))
            self._release(key)

    def _forward(self, stage: int, mb: int):
        key = (stage, mb)
        if stage == 0:
            x = self.inputs[mb]
        else:
            if key not in self.stage_in:  # the previous stage ran on this rank
                self.stage_in[key] = self.stage_out[(stage - 1, mb)].detach().requires_grad_()
            x = self.stage_in[key]
        saved = self.saved.setdefault(key, weakref.WeakSet())

        def pack(tensor):
            # Detached: a saved output would otherwise point back at its own graph node,
            # a cycle that outlives the graph until the garbage collector runs.
            holder = _Saved(tensor.detach())
            saved.add(holder)
            return holder

        if self.measure_activations and torch.is_grad_enabled():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
                y = self.chunks.forward_stage(stage, x)
        else:
            y = self.chunks.forward_stage(stage, x)
        if stage == self.schedule.num_stages - 1:
            y = self.loss_sum(y, self.targets[mb]) / self.num_tokens
            self.loss += y.detach()
        self.stage_out[key] = y
        if self.measure_activations:
            self.peak_live_microbatches = max(self.peak_live_microbatches, self._live_microbatches())

    def _backward(self, key: tuple[int, int], inputs_only: bool):
        stage, mb = key
        out = self.stage_out[key]
        if stage < self.schedule.num_stages - 1 and key not in self.grad_out:
            self.grad_out[key] = self.grad_in.pop((stage + 1, mb))  # the next stage ran here
        grad = self.grad_out.get(key)
        x = self.stage_in.get(key)
        if inputs_only:
            if x is not None:
                (self.grad_in[key],) = torch.autograd.grad(out, [x], grad, retain_graph=True)
        else:
            torch.autograd.backward(out, grad)
            if x is not None:
                self.grad_in[key] = x.grad

    def _stage_params(self, stage: int) -> list[torch.nn.Parameter]:
        modules = [self.chunks.layers[str(i)] for i in self.chunks.stage_layers[stage]]
        if stage == 0:
            modules.append(self.chunks.embedding)
        if stage == self.schedule.num_stages - 1:
            modules += [self.chunks.norm, self.chunks.output]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def _release(self, key):
        self.stage_out.pop(key, None)
        self.stage_in.pop(key, None)
        self.grad_out.pop(key, None)

    def _communicate(self, actions: tuple[Action, ...]):
        sends, recvs, received = [], [], []
        for a in actions:
            s, mb = a.stage, a.microbatch
            if a.kind in ("sF", "sB"):
                forward = a.kind == "sF"
                tensor = (self.stage_out[(s, mb)].detach() if forward else self.grad_in.pop((s, mb))).contiguous()
                sends.append((tensor, self._peer(s + 1 if forward else s - 1), self._tag(s, mb, not forward),
                              "activations" if forward else "activation_grads"))
            else:
                backward = a.kind == "rB"
                buffer = torch.empty(self.hidden_shape, device=self.device)
                source = s + 1 if backward else s - 1
                recvs.append((buffer, self._peer(source), self._tag(source, mb, backward)))
                received.append((a, buffer))
        send_works, recv_works = comm.batch_send_recv(self.mesh, "pp", sends, recvs)
        self.pending_sends += send_works
        start = time.perf_counter()
        for work in recv_works:
            work.wait()
        self.recv_wait_s += time.perf_counter() - start
        for a, buffer in received:
            if a.kind == "rF":
                self.stage_in[(a.stage, a.microbatch)] = buffer.requires_grad_(torch.is_grad_enabled())
            else:
                self.grad_out[(a.stage, a.microbatch)] = buffer

    def forward_only(self, inputs: list[torch.Tensor], targets: list[torch.Tensor], num_tokens: int) -> torch.Tensor:
        """Evaluation: every micro-batch through this rank's stages, no backward."""
        s = self.schedule
        actions = []
        for mb in range(s.num_microbatches):
            for stage in s.stages_of(self.rank):
                if stage > 0 and s.rank_of(stage - 1) != self.rank:
                    actions.append(Action(stage, "rF", mb))
                actions.append(Action(stage, "F", mb))
                if stage < s.num_stages - 1 and s.rank_of(stage + 1) != self.rank:
                    actions.append(Action(stage, "sF", mb))
        with torch.no_grad():
            return self.run(inputs, targets, num_tokens, tuple(actions))
