"""A cluster on one machine: hosts as network namespaces, each joined to a shared switch
by a shaped link.

    up      a switch namespace holding a bridge; per host a namespace with loopback and
            `eth0` (198.18.0.<i+1>/24, the benchmarking range, never routed out), its veth
            peer on the bridge; the link shaped both ways (htb for the rate, a random
            drop by a BPF filter for loss, netem for delay where the kernel has it).
            Traffic inside a host stays on its loopback (a host's own address is
            local), unshaped.
    run     one torchrun per host inside its namespace, meeting at host 0's address;
            gloo uses eth0; each host's torchrun gives its ranks LOCAL_WORLD_SIZE, from which
            meshpar places tp inside a host and the hierarchical all-reduce's halves.
    link    one host's link down, up, or shaped anew - while a job runs.
    down    every namespace made (their interfaces and queues go with them), the processes
            still in them killed first, the state file removed.

Every object made is recorded in a state file as it is made, so a crashed `up` or a
killed `run` can always be cleaned; nothing outside the namespaces it made is touched.
Needs root and the `ip` and `tc` tools.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUBNET = "198.18.0"
DEFAULT_STATE = Path(os.environ.get("MESHPAR_CLUSTER_STATE", "/run/meshpar-cluster.json"))


class ClusterError(RuntimeError):
    """Something the user can fix: no privilege, no tools, a cluster already up, a bad link."""


@dataclass
class Link:
    """A host's link: rate (tc's units: 200mbit, 1gbit), delay (1ms) and loss (2%)."""

    rate: str
    delay: str | None = None
    loss: str | None = None

    @staticmethod
    def parse(text: str) -> Link:
        parts = [p.strip() or None for p in text.split(",")]
        if not parts or not parts[0] or len(parts) > 3:
            raise ClusterError(f"--link {text!r}: give RATE[,DELAY[,LOSS]], e.g. 200mbit,1ms,2% (200mbit,,2% "
                               f"for loss without delay)")
        link = Link(*parts)
        link.bytes_per_s()
        if link.loss:
            _loss_share(link.loss)
        return link

    def bytes_per_s(self) -> float:
        """The rate in bytes per second (tc's units: bit, kbit, mbit, gbit; bps, kbps,
        mbps, gbps are bytes)."""
        import re

        found = re.fullmatch(r"([0-9.]+)\s*([kmgt]?)(bit|bps)", self.rate.lower())
        if not found:
            raise ClusterError(f"link rate {self.rate!r}: give tc's units, e.g. 200mbit or 1gbit")
        value = float(found[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[found[2]]
        return value / 8 if found[3] == "bit" else value

    def describe(self) -> str:
        return ", ".join(filter(None, [self.rate, self.delay and f"delay {self.delay}",
                                       self.loss and f"loss {self.loss}"]))


@dataclass
class ClusterState:
    prefix: str
    nodes: int
    ranks_per_node: int
    link: Link
    namespaces: list[str] = field(default_factory=list)  # made so far, in order
    links: dict[str, str] = field(default_factory=dict)  # host -> "up" / "down"

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def host(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def port(self, i: int) -> str:
        """Host i's port on the switch's bridge."""
        return f"h{i}"

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**asdict(self), "link": asdict(self.link)}, indent=1))
        tmp.replace(path)

    @staticmethod
    def load(path: Path) -> ClusterState:
        raw = json.loads(path.read_text())
        raw["link"] = Link(**raw["link"])
        return ClusterState(**raw)


def check_privileges() -> None:
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ClusterError(f"the emulated cluster needs the {' and '.join(missing)} tool(s) (iproute2)")
    if os.geteuid() != 0:
        raise ClusterError("the emulated cluster makes network namespaces, which needs root (run as root, or in a "
                           "container with CAP_NET_ADMIN)")


def _run(*argv: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = (["ip", "netns", "exec", namespace] if namespace else []) + list(argv)
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode:
        raise ClusterError(f"`{' '.join(command)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _loss_share(loss: str) -> float:
    try:
        share = float(loss.rstrip("%")) / 100
    except ValueError:
        share = -1.0
    if not 0 <= share < 1:
        raise ClusterError(f"loss {loss!r}: give a percentage below 100, e.g. 2%")
    return share


def _shape(namespace: str, device: str, link: Link, change: bool = False) -> None:
    """Egress of `device`: an htb class at the link's rate (netem below it for a delay,
    where the kernel has netem); for loss, a second class whose queue holds nothing
    (pfifo limit 0), fed that share of packets at random by a classic-BPF filter
    (`ld rand`) - packet loss without netem, which this machine's kernel lacks."""
    if change:
        _run("tc", "qdisc", "del", "dev", device, "root", namespace=namespace, check=False)
    tc = ("tc", "class", "add", "dev", device, "parent", "1:")
    # burst: a timer tick's worth at Gbit rates; quantum: htb's default (rate / 10) is too big
    shaped = ("htb", "rate", link.rate, "ceil", link.rate, "burst", "64k", "cburst", "64k", "quantum", "60000")
    _run("tc", "qdisc", "add", "dev", device, "root", "handle", "1:", "htb", "default", "1", namespace=namespace)
    _run(*tc, "classid", "1:1", *shaped, namespace=namespace)
    if link.delay:
        done = _run("tc", "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:", "netem", "delay",
                    link.delay, namespace=namespace, check=False)
        if done.returncode:
            raise ClusterError(f"this kernel cannot emulate delay (tc's netem: {done.stderr.strip()}); "
                               f"give a rate and loss only, e.g. --link {link.rate}" + (f",,{link.loss}" if link.loss else ""))
    if link.loss and _loss_share(link.loss) > 0:
        _run(*tc, "classid", "1:2", *shaped, namespace=namespace)
        _run("tc", "qdisc", "add", "dev", device, "parent", "1:2", "handle", "20:", "pfifo", "limit", "0",
             namespace=namespace)
        threshold = int(_loss_share(link.loss) * 2**32)
        # A = random u32; A >= threshold: no match (class 1:1); else class 1:2 (0x10002), dropped
        program = f"4,32 0 0 {2**32 - 0x1000 + 56},53 0 1 {threshold},6 0 0 0,6 0 0 {0x10002}"
        _run("tc", "filter", "add", "dev", device, "parent", "1:", "protocol", "all", "bpf", "bytecode", program,
             namespace=namespace)


def up(nodes: int, ranks_per_node: int, link: Link, state_path: Path = DEFAULT_STATE, prefix: str = "mpc") -> ClusterState:
    check_privileges()
    if nodes < 2 or ranks_per_node < 1:
        raise ClusterError(f"--nodes {nodes} --ranks-per-node {ranks_per_node}: at least 2 hosts of 1 rank")
    if nodes > 250:
        raise ClusterError(f"--nodes {nodes}: at most 250 hosts (one /24 of {SUBNET}.0)")
    if state_path.exists():
        raise ClusterError(f"a cluster is already up ({state_path}); `meshpar cluster down` first")
    existing = set(_namespaces())
    state = ClusterState(prefix, nodes, ranks_per_node, link)
    clash = [n for n in [state.switch] + [state.host(i) for i in range(nodes)] if n in existing]
    if clash:
        raise ClusterError(f"network namespaces {clash} exist and were not made by this cluster; remove them or "
                           f"choose another prefix")
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state.save(state_path)
    try:
        _add_namespace(state, state.switch, state_path)
        _run("ip", "link", "add", "br0", "type", "bridge", namespace=state.switch)
        _run("ip", "link", "set", "br0", "up", namespace=state.switch)
        for i in range(nodes):
            host = state.host(i)
            _add_namespace(state, host, state_path)
            # made inside the host's namespace, its peer moved to the switch: nothing in the root namespace
            _run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", state.port(i), namespace=host)
            _run("ip", "link", "set", state.port(i), "netns", state.switch, namespace=host)
            _run("ip", "link", "set", state.port(i), "master", "br0", "up", namespace=state.switch)
            _run("ip", "addr", "add", f"{state.address(i)}/24", "dev", "eth0", namespace=host)
            _run("ip", "link", "set", "eth0", "up", namespace=host)
            _shape(host, "eth0", link)
            _shape(state.switch, state.port(i), link)
            state.links[str(i)] = "up"
            state.save(state_path)
    except BaseException:
        down(state_path)
        raise
    return state


def _add_namespace(state: ClusterState, name: str, state_path: Path) -> None:
    _run("ip", "netns", "add", name)
    state.namespaces.append(name)
    state.save(state_path)
    _run("ip", "link", "set", "lo", "up", namespace=name)


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def load(state_path: Path = DEFAULT_STATE) -> ClusterState:
    if not state_path.exists():
        raise ClusterError(f"no cluster is up (no {state_path}); `meshpar cluster up` first")
    return ClusterState.load(state_path)


def set_link(host: int, how: str, state_path: Path = DEFAULT_STATE) -> str:
    """Host `host`'s link down, up, or shaped anew (RATE[,DELAY[,LOSS]])."""
    check_privileges()
    state = load(state_path)
    if not 0 <= host < state.nodes:
        raise ClusterError(f"host {host}: the cluster has hosts 0-{state.nodes - 1}")
    if how in ("down", "up"):
        _run("ip", "link", "set", state.port(host), how, namespace=state.switch)
        state.links[str(host)] = how
        state.save(state_path)
        return f"host {host}'s link is {how}"
    link = Link.parse(how)
    _shape(state.host(host), "eth0", link, change=True)
    _shape(state.switch, state.port(host), link, change=True)
    return f"host {host}'s link: {link.describe()}"


def down(state_path: Path = DEFAULT_STATE) -> list[str]:
    """Everything the state file records, removed (processes in the namespaces killed
    first); the namespaces removed, in the order made backwards."""
    if not state_path.exists():
        return []
    state = ClusterState.load(state_path)
    present = set(_namespaces())
    removed = []
    for name in reversed(state.namespaces):
        if name not in present:
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split() \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        _run("ip", "netns", "del", name, check=False)
        removed.append(name)
    state_path.unlink(missing_ok=True)
    return removed


def _python_arguments(command: list[str]) -> list[str] | None:
    """What follows this Python for `command`: `meshpar ...` as `-m meshpar ...`, `python
    SCRIPT ...` as `SCRIPT ...`; None for any other program."""
    if command[0] == "meshpar":
        return ["-m", "meshpar", *command[1:]]
    if Path(command[0]).name.startswith("python") and len(command) > 1:
        return command[1:]
    return None


def host_command(state: ClusterState, i: int, command: list[str], port: int, max_restarts: int = 0) -> list[str]:
    """The torchrun of host i, inside its namespace, for `command`: `meshpar ...` runs as
    `python -m meshpar ...`, `python SCRIPT ...` as SCRIPT under this Python, anything else
    as a program (--no-python). The hosts meet at host 0's store: statically (host i holds
    ranks i*K...(i+1)*K-1), or with `max_restarts` by c10d rendezvous - a host whose ranks
    fail restarts them and the others rejoin in a new round (each host gives its own
    address: the namespaces share one hostname; each host takes a consecutive block of
    ranks, hosts ordered by their addresses as strings), and each round meets at a fresh
    store: an agent restarts its ranks without counting a restart when another host
    rejoins, so the hosts' restart counts - which name an attempt in a store shared
    across rounds - can differ."""
    arguments = _python_arguments(command)
    target = arguments if arguments is not None else ["--no-python", *command]
    env = ["GLOO_SOCKET_IFNAME=eth0"]
    if max_restarts:  # c10d rendezvous: a restarted host and the others meet again in a new round
        meet = ["--nnodes", f"{state.nodes}:{state.nodes}", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{state.address(0)}:{port}", "--rdzv-id", f"{state.prefix}-{port}",
                "--rdzv-conf", f"is_host={int(i == 0)},read_timeout=20", "--local-addr", state.address(i),
                "--max-restarts", str(max_restarts)]
        env.append("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    else:  # static: host i holds ranks i*K...; a failed host's torchrun exits without reaching host 0
        meet = ["--nnodes", str(state.nodes), "--node-rank", str(i), "--master-addr", state.address(0),
                "--master-port", str(port)]
    return ["ip", "netns", "exec", state.host(i), "env", *env, sys.executable, "-m", "torch.distributed.run",
            "--nproc-per-node", str(state.ranks_per_node), *meet, *target]


def dealt_rank_commands(state: ClusterState, command: list[str], port: int) -> list[list[str]]:
    """Every rank started by hand, dealt to the hosts in turn (global rank r on host
    r mod N) instead of torchrun's consecutive blocks: consecutive ranks - a tp group -
    then sit on different hosts. For measuring what the placement saves; each rank is
    told LOCAL_WORLD_SIZE as torchrun would, so meshpar's placement report (which assumes
    consecutive ranks per node) does not describe this layout."""
    from meshpar.train.launch import local_rank_env

    arguments = _python_arguments(command)
    program = [sys.executable, *arguments] if arguments is not None else command
    world = state.nodes * state.ranks_per_node
    out = []
    for rank in range(world):
        host = rank % state.nodes
        env = {"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1", "GROUP_RANK": str(host),
               **local_rank_env(rank, world, port, master_addr=state.address(0), local_rank=rank // state.nodes,
                                local_world_size=state.ranks_per_node)}
        out.append(["ip", "netns", "exec", state.host(host), "env", *(f"{k}={v}" for k, v in env.items()), *program])
    return out
