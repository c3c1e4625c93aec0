"""--return-freed-memory: blocks a step frees go back to the system, where glibc's rising
mmap threshold would keep them in the heap."""

import subprocess
import sys

import pytest

from meshpar.cli import build_parser, config_from_args

PROBE = """
import sys, torch
from meshpar.train.host_memory import return_freed_memory

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "on":
    assert return_freed_memory()
blocks = [torch.ones(2**18) for _ in range(64)]  # 64 blocks of 1 MiB, touched
del blocks  # freed: glibc's threshold rises to 1 MiB, unless fixed
blocks = [torch.ones(2**18) for _ in range(64)]
before = resident_mib()
del blocks[::2]  # every other block freed: holes in a heap, whole mappings otherwise
print(before - resident_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_go_back_to_the_system_only_when_asked():
    returned = {mode: float(subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                                           check=True).stdout) for mode in ("on", "off")}
    assert returned["on"] >= 30, returned  # the 32 MiB freed
    assert returned["off"] < 4, returned  # glibc's default keeps them
    cfg = config_from_args(build_parser().parse_args(["train", "--return-freed-memory"]))
    assert cfg.run.return_freed_memory and not config_from_args(
        build_parser().parse_args(["train"])).run.return_freed_memory
