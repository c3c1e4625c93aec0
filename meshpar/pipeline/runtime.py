"""The one interpreter: executes any Schedule's actions on this rank, in order.

Consecutive communication actions go out together as one batch of point-to-point
operations; receives are waited for before the compute that needs them, sends at the end
of the step. Gradients accumulate in the parameters across micro-batches. The runtime
also measures what the simulator predicts: the micro-batches whose saved activations are
alive (through saved_tensors_hooks), and the time spent waiting on receives.

For the asynchronous schedule (PipeDream-2BW) the same interpreter runs one long 1F1B
stream cut into steps: in-flight micro-batches carry over from one step to the next, and
each batch's forwards and backwards use the weight version that was current when the
batch started (`begin_version`), while the optimizer updates the parameters.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import nullcontext
import weakref
from typing import Callable

import torch
from torch.func import functional_call

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.pipeline.actions import Action, Schedule
from meshpar.pipeline.schedules import step_start
from meshpar.parallel.weight_casts import keep_saved
from meshpar.pipeline.stages import PipelineStages
from meshpar.pipeline.weight_grads import DeferredWeightGrads


class _Saved:
    """Wraps one tensor autograd keeps; alive exactly as long as autograd holds it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class _State:
    """What is in flight on this rank: per (stage, micro-batch) inputs, outputs, gradients."""

    def __init__(self):
        self.stage_in, self.stage_out, self.grad_in, self.grad_out = {}, {}, {}, {}
        self.saved: dict[tuple[int, int], weakref.WeakSet] = {}
        self.pending_sends = []


class PipelineRuntime:
    def __init__(self, schedule: Schedule, chunks: PipelineStages, mesh: ParallelMesh,
                 loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 hidden_shape: tuple[int, ...], device: torch.device, measure_activations: bool = True,
                 microbatches_per_step: int | None = None, split_at_linears: bool = True):
        self.schedule, self.chunks, self.mesh = schedule, chunks, mesh
        self.loss_sum, self.hidden_shape, self.device = loss_sum, hidden_shape, device
        self.rank = mesh.index("pp")
        self.actions = schedule.actions[self.rank]
        self.pp_ranks = mesh.ranks("pp")  # global rank of each pipeline rank
        self.measure_activations = measure_activations  # costs a hook call per saved tensor
        self.microbatches_per_step = microbatches_per_step or schedule.num_microbatches
        self.peak_live_microbatches = 0
        self.peak_saved_bytes = 0  # activations autograd holds on this rank, at their peak
        self.recv_wait_s = 0.0
        self.state = _State()
        self.versions: dict[int, dict[str, torch.Tensor]] = {}  # async: batch -> weights
        self.backwards_done: Counter[int] = Counter()  # async: batch -> its backwards run on this rank
        self._backwards_of: Counter[int] | None = None  # async: batch -> its backwards in this rank's stream
        self.compute_context = nullcontext  # e.g. autocast for 16-bit compute; forwards only
        # The forwards' saved-tensor hooks, `hooks(pack=None, unpack=None)` (weight_casts.py):
        # weight copies recast or kept; a measurement's pack/unpack for the rest.
        self.saved_tensor_hooks: Callable = keep_saved
        self.loss_scale = 1.0  # fp16: backward runs from loss * loss_scale
        # The zero-bubble split: I and W at the linear layers (weight_grads.py), or where
        # that cannot reach (compiled code) the generic split, which walks the graph twice.
        self.weight_grads = (DeferredWeightGrads(chunks) if schedule.splits_backward and split_at_linears
                             else None)

    # --- helpers ----------------------------------------------------------------------

    def _peer(self, stage: int) -> int:
        return self.pp_ranks[self.schedule.rank_of(stage)]

    def _tag(self, stage: int, mb: int, backward: bool, evaluation: bool = False) -> int:
        return ((stage * self.schedule.num_microbatches + mb) * 2 + int(backward)) * 2 + int(evaluation)

    def _live_saved_bytes(self) -> int:
        """Bytes of the storages autograd keeps for the micro-batches in flight, and of
        what their linear layers hold for W (each storage once; parameters are not
        activations)."""
        params = {p.untyped_storage().data_ptr() for p in self.chunks.parameters()}
        held = [holder.tensor for saved in self.state.saved.values() for holder in saved]
        if self.weight_grads is not None:
            held += self.weight_grads.held_tensors()
        storages = {}
        for tensor in held:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def _live_microbatches(self) -> int:
        return sum(1 for key, saved in self.state.saved.items()
                   if len(saved) or (self.weight_grads is not None and self.weight_grads.held(key)))

    # --- synchronous schedules: one step = the whole action list -----------------------

    def run(self, inputs: list[torch.Tensor], targets: list[torch.Tensor], num_tokens: int) -> torch.Tensor:
        """Execute this rank's actions for one step; returns the summed loss of the
        micro-batches whose last stage is here (zero elsewhere), divided by num_tokens."""
        self.state = _State()
        loss = self._execute(self.actions, inputs, targets, num_tokens, first_microbatch=0)
        self._wait_sends()
        return loss

    # --- asynchronous: one step = one segment of the stream ---------------------------

    def segment(self, step: int) -> tuple[Action, ...]:
        """This rank's actions of step `step`: from the forward of the step's first
        micro-batch (and its receive) up to the next step's."""
        m = self.microbatches_per_step
        return self.actions[step_start(self.actions, step, m):step_start(self.actions, step + 1, m)]

    def begin_version(self, batch: int):
        """Snapshot the parameters as the weights batch `batch` will use throughout."""
        self.versions[batch] = {name: p.detach().clone().requires_grad_()
                                for name, p in self.chunks.named_parameters()}

    def finish_version(self, batch: int):
        """Hand batch `batch`'s accumulated gradients to the parameters' .grad (the data
        parallelism adopts them for the usual reduction and optimizer step) and drop that
        weight version."""
        if self._backwards_of is None:  # counted once: the stream spans the whole run
            self._backwards_of = Counter(a.microbatch // self.microbatches_per_step
                                         for a in self.actions if a.kind == "B")
        expected, done = self._backwards_of[batch], self.backwards_done.pop(batch, 0)
        if done != expected:  # async_steps_complete refuses such layouts before any rank starts
            raise RuntimeError(f"batch {batch}'s gradient is incomplete on this rank: {done} of its {expected} "
                               f"backwards ran before it was applied")
        version = self.versions.pop(batch)
        for name, p in self.chunks.named_parameters():
            p.grad = version[name].grad

    def run_segment(self, step: int, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                    num_tokens: int, last: bool) -> torch.Tensor:
        loss = self._execute(self.segment(step), inputs, targets, num_tokens,
                             first_microbatch=step * self.microbatches_per_step)
        if last:
            self._wait_sends()
        return loss

    # --- the interpreter ----------------------------------------------------------------

    def _execute(self, actions, inputs, targets, num_tokens, first_microbatch: int,
                 evaluation: bool = False) -> torch.Tensor:
        self.inputs, self.targets, self.num_tokens = inputs, targets, num_tokens
        self.first_microbatch, self.evaluation = first_microbatch, evaluation
        self.loss = torch.zeros((), device=self.device)
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
        return self.loss

    def _wait_sends(self):
        with self.mesh.ledger.waiting("pp", "send", "activations"):
            for work in self.state.pending_sends:
                work.wait()
        self.state.pending_sends.clear()

    def _compute(self, a: Action):
        with torch.profiler.record_function(f"{a.kind} stage {a.stage} micro-batch {a.microbatch}"):
            self._compute_action(a)

    def _compute_action(self, a: Action):
        key = (a.stage, a.microbatch)
        if a.kind == "F":
            self._forward(a.stage, a.microbatch)
        elif a.kind == "B":
            self._backward(key, inputs_only=False)
            self._release(key)
            if self.versions:  # async: count each batch's backwards, applied only once all ran
                self.backwards_done[a.microbatch // self.microbatches_per_step] += 1
        elif a.kind == "I":
            self._backward(key, inputs_only=True)
        elif a.kind == "W":
            if self.weight_grads is not None:
                self.weight_grads.weight_pass(key)
            else:
                st = self.state
                weights = self.chunks.stage_parameters(a.stage)
                torch.autograd.backward(st.stage_out[key], st.grad_out.get(key), inputs=weights)
            self._release(key)

    def _forward(self, stage: int, mb: int):
        st, key = self.state, (stage, mb)
        local_mb = mb - self.first_microbatch
        if stage == 0:
            x = self.inputs[local_mb]
        else:
            if key not in st.stage_in:  # the previous stage ran on this rank
                st.stage_in[key] = st.stage_out[(stage - 1, mb)].detach().requires_grad_(torch.is_grad_enabled())
            x = st.stage_in[key]
        saved = st.saved.setdefault(key, weakref.WeakSet())

        def pack(tensor):
            # Detached: a saved output would otherwise point back at its own graph node,
            # a cycle that outlives the graph until the garbage collector runs.
            holder = _Saved(tensor.detach())
            saved.add(holder)
            return holder

        version = self.versions.get(mb // self.microbatches_per_step) if self.versions else None
        measure = self.measure_activations and torch.is_grad_enabled()
        split = (self.weight_grads.recording() if self.weight_grads is not None and torch.is_grad_enabled()
                 else nullcontext())
        with self.saved_tensor_hooks(pack, lambda h: h.tensor) if measure else self.saved_tensor_hooks(), split:
            with self.compute_context():
                if version is not None:
                    y = functional_call(self.chunks, version, (stage, x))
                else:
                    y = self.chunks.forward_stage(stage, x)
            if stage == self.schedule.num_stages - 1:
                y = self.loss_sum(y, self.targets[local_mb]) / self.num_tokens
                self.loss += y.detach()
                if self.loss_scale != 1.0:
                    y = y * self.loss_scale
        st.stage_out[key] = y
        if measure:
            self.peak_live_microbatches = max(self.peak_live_microbatches, self._live_microbatches())
            self.peak_saved_bytes = max(self.peak_saved_bytes, self._live_saved_bytes())

    def _backward(self, key: tuple[int, int], inputs_only: bool):
        st = self.state
        stage, mb = key
        out = st.stage_out[key]
        if stage < self.schedule.num_stages - 1 and key not in st.grad_out:
            st.grad_out[key] = st.grad_in.pop((stage + 1, mb))  # the next stage ran here
        grad = st.grad_out.get(key)
        x = st.stage_in.get(key)
        if inputs_only and self.weight_grads is not None:
            with self.weight_grads.input_pass(key):
                torch.autograd.backward(out, grad)
            st.stage_out.pop(key)  # the graph is gone; W needs only what the linear layers held
            if x is not None:
                st.grad_in[key] = x.grad
        elif inputs_only:
            if x is not None:
                (st.grad_in[key],) = torch.autograd.grad(out, [x], grad, retain_graph=True)
        else:
            torch.autograd.backward(out, grad)
            if x is not None:
                st.grad_in[key] = x.grad

    def _release(self, key):
        st = self.state
        st.stage_out.pop(key, None)
        st.stage_in.pop(key, None)
        st.grad_out.pop(key, None)
        st.saved.pop(key, None)

    def _communicate(self, actions: tuple[Action, ...]):
        st = self.state
        sends, recvs, received = [], [], []
        for a in actions:
            s, mb = a.stage, a.microbatch
            if a.kind in ("sF", "sB"):
                forward = a.kind == "sF"
                tensor = (st.stage_out[(s, mb)].detach() if forward else st.grad_in.pop((s, mb))).contiguous()
                sends.append((tensor, self._peer(s + 1 if forward else s - 1),
                              self._tag(s, mb, not forward, self.evaluation),
                              "activations" if forward else "activation_grads"))
            else:
                backward = a.kind == "rB"
                buffer = torch.empty(self.hidden_shape, device=self.device)
                source = s + 1 if backward else s - 1
                recvs.append((buffer, self._peer(source), self._tag(source, mb, backward, self.evaluation)))
                received.append((a, buffer))
        send_works, recv_works = comm.batch_send_recv(self.mesh, "pp", sends, recvs)
        st.pending_sends += send_works
        start = time.perf_counter()
        with self.mesh.ledger.waiting("pp", "recv", "activations"):
            for work in recv_works:
                work.wait()
        self.recv_wait_s += time.perf_counter() - start
        for a, buffer in received:
            if a.kind == "rF":
                st.stage_in[(a.stage, a.microbatch)] = buffer.requires_grad_(torch.is_grad_enabled())
            else:
                st.grad_out[(a.stage, a.microbatch)] = buffer

    def forward_only(self, inputs: list[torch.Tensor], targets: list[torch.Tensor], num_tokens: int) -> torch.Tensor:
        """Evaluation with the current parameters: every micro-batch through this rank's
        stages, no backward. Training state in flight (async) is set aside meanwhile."""
        s = self.schedule
        actions = []
        for mb in range(len(inputs)):
            for stage in s.stages_of(self.rank):
                if stage > 0 and s.rank_of(stage - 1) != self.rank:
                    actions.append(Action(stage, "rF", mb))
                actions.append(Action(stage, "F", mb))
                if stage < s.num_stages - 1 and s.rank_of(stage + 1) != self.rank:
                    actions.append(Action(stage, "sF", mb))
        training, versions = self.state, self.versions
        self.state, self.versions = _State(), {}
        try:
            with torch.no_grad():
                loss = self._execute(tuple(actions), inputs, targets, num_tokens, 0, evaluation=True)
            self._wait_sends()
        finally:
            self.state, self.versions = training, versions
        return loss

