"""`meshpar env`: what this machine has - versions, devices, backends - and the topology
meshpar would detect (ranks per node, nodes) from torchrun's variables."""

from __future__ import annotations

import os
import platform
import socket
import sys


def describe() -> list[tuple[str, str]]:
    import numpy
    import torch
    import torch.distributed as dist

    from meshpar import __version__

    rows = [("meshpar", __version__), ("python", sys.version.split()[0]), ("torch", torch.__version__),
            ("numpy", numpy.__version__), ("platform", platform.platform()), ("host", socket.gethostname()),
            ("cpu cores", str(os.cpu_count())), ("torch threads", str(torch.get_num_threads()))]
    if torch.cuda.is_available():
        rows.append(("cuda", f"{torch.version.cuda}, {torch.cuda.device_count()} device(s)"))
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append((f"  cuda:{i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
    else:
        rows.append(("cuda", "not available"))
    backends = [name for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available()),
                                      ("mpi", dist.is_mpi_available())) if ok]
    rows.append(("distributed backends", ", ".join(backends) or "none"))
    rows.append(("default backend", "nccl (--device cuda)" if torch.cuda.is_available() else "gloo"))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        rows.append(("launcher", f"torchrun: rank {os.environ['RANK']} of {world}"))
        rows.append(("topology", f"{world // max(local, 1)} node(s) x {local} ranks per node (LOCAL_WORLD_SIZE)"))
    else:
        devices = torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count()
        rows.append(("launcher", "none: `meshpar train` starts its ranks on this machine"))
        rows.append(("topology", f"1 node; local ranks share {devices} "
                                 f"{'GPU(s)' if torch.cuda.is_available() else 'CPU core(s)'}"))
    return rows


def env_command(_args) -> int:
    rows = describe()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
