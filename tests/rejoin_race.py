"""Run as `meshpar cluster run --max-restarts 2 -- python tests/rejoin_race.py HOST DIR` on
2 hosts (HOST: the second host's namespace; DIR: an empty directory): the race that left
a restarted job unable to meet. The first time they run, host 1's ranks fail at once
while host 0's sleep, so host 0's agent restarts its ranks because host 1 rejoined -
which counts no restart - and the two hosts' restart counts differ from then on. A
rank's second start joins the process group as meshpar's trainer does
(launch.restart_safe_store) and all-reduces its rank: rank 0 prints the sum.

Used by test_cluster.py; meshpar itself knows nothing of it."""

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from meshpar.train.launch import restart_safe_store

started = Path(sys.argv[2]) / f"rank-{os.environ['RANK']}-started"
if not started.exists():
    started.touch()
    if subprocess.run(["ip", "netns", "identify"], capture_output=True, text=True).stdout.strip() == sys.argv[1]:
        sys.exit(1)
    time.sleep(120)  # stopped by the agent when host 1 rejoins
timeout = timedelta(seconds=20)
dist.init_process_group("gloo", timeout=timeout, **restart_safe_store(timeout))
total = torch.tensor(float(dist.get_rank()))
dist.all_reduce(total)
if dist.get_rank() == 0:
    print(f"sum of ranks {total.item():g}; restart count {os.environ['TORCHELASTIC_RESTART_COUNT']}", flush=True)
dist.destroy_process_group()
