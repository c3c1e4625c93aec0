"""The generation engine: one per rank of a model split for serving, every rank in step.

    driver      the first stage's tp rank 0 (global rank 0): it takes requests, decides
                each forward (a command) and receives the tokens chosen
    followers   every other rank: each runs the commands as they reach it

A command - which sequences (their cache slots), where their new tokens start, the
tokens, and for a sequence just begun its sampling rule - goes from the driver to its tp
group (a broadcast), through the first stage, to each next stage with the hidden states
(a send to the same tp index), and the last stage chooses each sequence's next token over
its split vocabulary (sampling.py); its tp rank 0 sends them back to the driver.

The driver schedules: a new request's prompt runs as a command of its own (prefill) as
soon as a cache slot is free; the sequences decoding are split into one group per
pipeline stage, each group a command of one token per sequence, so while one group's
tokens come back the others are in the other stages. New requests join between decode
steps; a finished sequence frees its slot at once. An idle driver sends a heartbeat now
and then, so no follower's wait reaches the process group's timeout.

Under tensor parallelism every rank of a stage runs each command; data and context
parallelism and virtual pipeline stages are not used for generation.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from meshpar import comm
from meshpar.parallel.apply import ParallelModel
from meshpar.serve.kv_cache import KVCache, Rows
from meshpar.serve.sampling import SamplingRule, choose, vocabulary_size

STOP, FORWARD, IDLE = 0, 1, 2
ROW_FIELDS = 7  # slot, start, fresh, temperature (float64 bits), top_k, top_p (float64 bits), seed
SEND, TOKENS = 11, 12  # point-to-point tags: a command down the pipeline, the tokens back


@dataclass(eq=False)
class Request:
    """One sequence to continue. The engine fills `tokens` (the continuation) and
    `finish_reason` ("stop": a stop token came and is the last token; "length":
    max_new_tokens reached; or what `cancelled` says, set by another thread to end it at
    its next token), calling `on_token(request, token)` on the driver as each token
    arrives (finish_reason already set on the last), and sets `done` at the end."""

    prompt: list[int]
    max_new_tokens: int
    rule: SamplingRule = SamplingRule()
    stop: frozenset[int] = frozenset()
    on_token: Callable[[Request, int], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0  # its prefill issued
    first_token: float = 0.0
    finished: float = 0.0

    @property
    def prefill_s(self) -> float:
        return self.first_token - self.started

    @property
    def decode_s(self) -> float:
        return self.finished - self.first_token


@dataclass
class Command:
    """One forward: `rows` (slots, starts, new), the new tokens (rows, new), and the rule
    of each row whose sequence starts with it (None for the others)."""

    op: int
    rows: Rows = field(default_factory=lambda: Rows([], [], 0))
    tokens: torch.Tensor | None = None
    fresh: list[SamplingRule | None] = field(default_factory=list)
    chosen: torch.Tensor | None = None  # the last stage's answer (rows,), where it is known
    prefill: bool = False

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(header [op, rows, new, payload length], payload) as int64."""
        values = []
        for slot, start, rule in zip(self.rows.slots, self.rows.starts, self.fresh):
            r = rule or SamplingRule()
            values += [slot, start, rule is not None, _bits(r.temperature), r.top_k, _bits(r.top_p), r.seed]
        payload = torch.tensor(values, dtype=torch.long)
        if self.tokens is not None:
            payload = torch.cat([payload, self.tokens.flatten().cpu()])
        header = torch.tensor([self.op, len(self.rows.slots), self.rows.new, payload.numel()])
        return header, payload

    @staticmethod
    def decode(header: torch.Tensor, payload: torch.Tensor) -> Command:
        op, rows, new, _ = header.tolist()
        fields = payload[:rows * ROW_FIELDS].view(rows, ROW_FIELDS).tolist()
        fresh = [SamplingRule(_float(t), k, _float(p), seed) if is_fresh else None
                 for _, _, is_fresh, t, k, p, seed in fields]
        tokens = payload[rows * ROW_FIELDS:].view(rows, new)
        return Command(op, Rows([f[0] for f in fields], [f[1] for f in fields], new), tokens, fresh)


def _bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float64).view(torch.long))


def _float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.long).view(torch.float64))


class Engine:
    """Generation over `split` for up to `slots` sequences at once of up to `positions`
    tokens each (prompt and continuation). Use as a context manager: it puts a KV cache
    in place of every attention core this rank holds and gives the cores back at the
    end. Every rank of the mesh makes one; the driver then `run`s requests or `serve`s
    them, the others `follow`."""

    def __init__(self, split: ParallelModel, slots: int, positions: int, heartbeat_s: float = 5.0):
        mesh = split.mesh
        problems = generation_problems(split)
        if problems:
            raise ValueError("; ".join(problems))
        self.split, self.mesh, self.slots, self.positions = split, mesh, slots, positions
        self.stage, self.stages = mesh.index("pp"), mesh.size("pp")
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        self.driver = self.first and mesh.index("tp") == 0
        self.heartbeat_s = heartbeat_s
        parameter = next(split.module.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.rows = Rows([], [], 0)  # what the current forward computes, read by every cache
        self.caches = [KVCache(self.rows, slots, positions) for _ in split.attention_cores()]
        self.vocabulary: int | None = None
        # the last stage's: each slot's rule and generator (the sequence's seed)
        self.rules: list[SamplingRule] = [SamplingRule()] * slots
        self.generators: list[torch.Generator | None] = [None] * slots
        # the driver's
        self.incoming: queue.Queue[Request | None] = queue.Queue()
        self.stopping = threading.Event()
        self.free = deque(range(slots))
        self.active: dict[int, Request] = {}
        self.prefills: deque[int] = deque()
        self.ready: list[int] = []
        self.in_flight: deque[Command] = deque()
        self.sends: list = []  # point-to-point works not yet known complete (their tensors kept)

    # -- setup ----------------------------------------------------------------------------------

    def __enter__(self) -> Engine:
        cores = self.split.attention_cores()
        self._saved = [core.__dict__.get("attend") for core in cores]
        for core, cache in zip(cores, self.caches):
            core.attend = cache
        self._was_training = self.split.module.training
        self.split.module.eval()
        return self

    def __exit__(self, *exc) -> None:
        for core, attend in zip(self.split.attention_cores(), self._saved):
            if attend is None:
                del core.attend  # meshpar's Llama: its own method again
            else:
                core.attend = attend
        if self.split.pipelined:
            self.split.module.positions = None
        self.split.module.train(self._was_training)
        for work in self.sends:
            work.wait()

    def kv_cache_bytes(self) -> int:
        """The bytes this rank's KV caches hold."""
        return sum(cache.nbytes() for cache in self.caches)

    # -- the driver -----------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request (any thread); ValueError if it cannot be served."""
        problems = request_problems(request, self.positions)
        if problems:
            raise ValueError("; ".join(problems))
        self.incoming.put(request)

    def busy(self) -> bool:
        return bool(self.active or self.in_flight or any(r is not None for r in list(self.incoming.queue)))

    def run(self, requests: list[Request]) -> list[Request]:
        """Every request to its end (the driver)."""
        for request in requests:
            self.submit(request)
        while not all(r.done.is_set() for r in requests):
            self.step()
        return requests

    def serve(self) -> None:
        """Serve what is submitted until `shutdown`, and then until every request has
        ended; then stop the followers (the driver)."""
        try:
            while not (self.stopping.is_set() and not self.busy()):
                if not self.step():
                    self._wait_for_work()
        finally:
            self.stop()

    def shutdown(self) -> None:
        """End `serve` once the requests running have ended (any thread)."""
        self.stopping.set()
        self.incoming.put(None)  # wakes a driver waiting for work

    def stop(self) -> None:
        """End the followers' loops (the driver)."""
        self._issue(Command(STOP))

    def step(self) -> bool:
        """One scheduling action: finish the oldest forward, or start a prefill or a
        decode; False when there was nothing to do."""
        while self.free and not self.incoming.empty():
            request = self.incoming.get()
            if request is None:
                continue
            slot = self.free.popleft()
            self.active[slot] = request
            self.prefills.append(slot)
        depth = self.stages  # forwards in flight: one per stage
        if self.in_flight and (len(self.in_flight) >= depth or not (self.prefills or self.ready)):
            self._finish(self.in_flight.popleft())
        elif self.prefills:
            slot = self.prefills.popleft()
            request = self.active[slot]
            request.started = time.perf_counter()
            tokens = torch.tensor([request.prompt], device=self.device)
            self._issue(Command(FORWARD, Rows([slot], [0], len(request.prompt)), tokens, [request.rule],
                                prefill=True))
        elif self.ready:
            decoding = len(self.ready) + sum(len(c.rows.slots) for c in self.in_flight)
            size = math.ceil(decoding / depth)  # a group per stage
            group, self.ready = self.ready[:size], self.ready[size:]
            starts = [len(self.active[s].prompt) + len(self.active[s].tokens) - 1 for s in group]
            tokens = torch.tensor([[self.active[s].tokens[-1]] for s in group], device=self.device)
            self._issue(Command(FORWARD, Rows(group, starts, 1), tokens, [None] * len(group)))
        else:
            return False
        return True

    def _wait_for_work(self) -> None:
        """Block for a request up to the heartbeat; none came: a heartbeat to the followers."""
        try:
            request = self.incoming.get(timeout=self.heartbeat_s)
        except queue.Empty:
            self._issue(Command(IDLE))
            return
        if request is not None:
            self.incoming.put(request)  # step() takes it, in its order with the others

    def _issue(self, command: Command) -> None:
        header, payload = command.encode()
        self._tp_broadcast(header, payload)
        if command.op == FORWARD:
            command.chosen = self._compute(command, header, payload, None)
            self.in_flight.append(command)
        elif self.stages > 1:
            self._send(header, payload, None)

    def _finish(self, command: Command) -> None:
        if command.chosen is None:  # the last stage's tp rank 0 sends the tokens back
            command.chosen = torch.empty(len(command.rows.slots), dtype=torch.long, device=self.device)
            _, recvs = comm.batch_send_recv(self.mesh, "pp", [],
                                            [(command.chosen, self.mesh.peer("pp", self.stages - 1), TOKENS)])
            recvs[0].wait()
        now = time.perf_counter()
        for slot, token in zip(command.rows.slots, command.chosen.tolist()):
            request = self.active[slot]
            request.tokens.append(token)
            if command.prefill:
                request.first_token = now
            if request.cancelled or token in request.stop or len(request.tokens) == request.max_new_tokens:
                request.finish_reason = request.cancelled or ("stop" if token in request.stop else "length")
                request.finished = now
            if request.on_token is not None:
                request.on_token(request, token)
            if request.finish_reason:
                del self.active[slot]
                self.free.append(slot)
                request.done.set()
            else:
                self.ready.append(slot)

    # -- every rank -----------------------------------------------------------------------------

    def follow(self) -> None:
        """Run commands as they come until the driver stops (every rank but the driver)."""
        while True:
            header, payload, hidden = self._receive()
            op = int(header[0])
            if op != FORWARD:
                if not self.last:
                    self._send(header, payload, None)
                if op == STOP:
                    return
                continue
            self._compute(Command.decode(header, payload), header, payload, hidden)

    def _compute(self, command: Command, header: torch.Tensor, payload: torch.Tensor,
                 hidden: torch.Tensor | None) -> torch.Tensor | None:
        """This stage's forward of `command` (`header` and `payload`: its wire form); the
        next stage gets it with the output, or (the last stage) the next tokens are chosen,
        returned and, down a pipeline, sent back."""
        rows = command.rows
        self.rows.slots, self.rows.starts, self.rows.new = rows.slots, rows.starts, rows.new
        positions = rows.positions(self.device)
        with torch.no_grad():
            if not self.split.pipelined:
                out = self.split.forward(command.tokens.to(self.device), positions)
            else:
                stages = self.split.module
                stages.positions = positions
                out = stages.forward_stage(self.stage, command.tokens.to(self.device) if self.first else hidden)
            if not self.last:
                self._send(header, payload, out)
                return None
            return self._choose(command, out[:, -1])

    def _choose(self, command: Command, logits: torch.Tensor) -> torch.Tensor:
        slots = command.rows.slots
        for slot, rule in zip(slots, command.fresh):
            if rule is not None:
                self.rules[slot] = rule
                self.generators[slot] = torch.Generator().manual_seed(rule.seed) if rule.temperature else None
        self.vocabulary = self.vocabulary or vocabulary_size(self.split, logits)
        chosen = choose(self.split, logits, [self.rules[s] for s in slots], [self.generators[s] for s in slots],
                        self.vocabulary)
        if self.stages > 1 and self.mesh.index("tp") == 0:
            self._send_to(chosen.contiguous(), self.mesh.peer("pp", 0), TOKENS)
        return chosen

    # -- moving commands --------------------------------------------------------------------------

    def _tp_broadcast(self, header: torch.Tensor | None = None, payload: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """A command over the first stage's tp group: the driver's (header, payload) sent,
        or - given none, on the others - received."""
        if self.mesh.size("tp") == 1:
            return header, payload
        empty = torch.empty(4, dtype=torch.long, device=self.device)
        header = comm.broadcast(self.mesh, "tp", empty if header is None else header.to(self.device), tag="command")
        if payload is None:
            payload = torch.empty(int(header[3]), dtype=torch.long, device=self.device)
        if payload.numel():
            payload = comm.broadcast(self.mesh, "tp", payload.to(self.device), tag="command")
        return header, payload

    def _receive(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The next command (and hidden states): from the driver on the first stage, from
        the stage before on the others."""
        if self.first:
            header, payload = self._tp_broadcast()
            return header.cpu(), payload.cpu(), None
        previous = self.mesh.peer("pp", self.stage - 1)
        header = self._recv_from(torch.empty(4, dtype=torch.long, device=self.device), previous)
        op, rows, new, length = header.tolist()
        payload = torch.empty(length, dtype=torch.long, device=self.device)
        if length:
            self._recv_from(payload, previous)
        hidden = None
        if op == FORWARD:
            hidden = self._recv_from(torch.empty(rows, new, self.split.plan.pipeline.hidden_size, dtype=self.dtype,
                                                 device=self.device), previous)
        return header.cpu(), payload.cpu(), hidden

    def _send(self, header: torch.Tensor, payload: torch.Tensor, hidden: torch.Tensor | None) -> None:
        following = self.mesh.peer("pp", self.stage + 1)
        for tensor in (header, payload) + ((hidden,) if hidden is not None else ()):
            if tensor.numel():
                self._send_to(tensor.to(self.device).contiguous(), following, SEND)

    def _send_to(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        self.sends = [work for work in self.sends if not work.is_completed()]
        works, _ = comm.batch_send_recv(self.mesh, "pp", [(tensor, peer, tag, "generate")], [])
        self.sends += works

    def _recv_from(self, buffer: torch.Tensor, peer: int) -> torch.Tensor:
        _, works = comm.batch_send_recv(self.mesh, "pp", [], [(buffer, peer, SEND)])
        works[0].wait()
        return buffer


def request_problems(request: Request, positions: int) -> list[str]:
    """Why `request` cannot be served in sequences of `positions` tokens, if it cannot."""
    found = [f"sampling: {p}" for p in request.rule.problems()]
    if not request.prompt:
        found.append("the prompt is empty: give at least one token")
    if request.max_new_tokens < 1:
        found.append(f"max_new_tokens {request.max_new_tokens} must be at least 1")
    if len(request.prompt) + request.max_new_tokens > positions:
        found.append(f"the prompt's {len(request.prompt)} tokens and {request.max_new_tokens} new ones exceed "
                     f"the {positions} positions a sequence may have")
    return found


def generation_problems(split: ParallelModel) -> list[str]:
    """Why `split` cannot generate, if it cannot."""
    found = []
    for axis in ("dp", "cp"):
        if split.mesh.size(axis) > 1:
            found.append(f"generation runs under tensor and pipeline parallelism: {axis}={split.mesh.size(axis)} "
                         f"is not used for it (split the model with {axis}=1)")
    if split.pipelined and split.num_stages != split.mesh.size("pp"):
        found.append(f"generation runs one stage per pipeline rank: {split.num_stages} stages over "
                     f"pp={split.mesh.size('pp')} (virtual stages) are not supported")
    if not split.attention_cores():
        found.append("generation needs the plan's `attention`: the modules whose attend(q, k, v) is the causal "
                     "attention core, where the KV cache goes")
    if split.pipelined and split.plan.pipeline.block_args is None:
        found.append("generation needs the pipeline plan's `block_args` to give the blocks the tokens' positions")
    if not split.pipelined and not split.plan.positions:
        found.append("generation needs the plan's `positions` (the forward's keyword for the tokens' positions)")
    return found
