"""A custom model (examples/gpt2.py) with a custom loop on 4 ranks: tensor parallel over 2
with sequence parallelism (the blocks' norms and residuals on half the sequence each),
data parallel over 2 with ZeRO-1.

    torchrun --standalone --nproc-per-node=4 examples/tp_dp_zero1.py
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import meshpar  # noqa: E402
from gpt2 import GPT2, gpt2_plan  # noqa: E402

mesh = meshpar.init_mesh(dp=2, tp=2)
model = meshpar.parallelize(GPT2(seed=0), mesh, gpt2_plan(), zero=1, lr=1e-3, sequence_parallel=True)

# Data: this example's own source, as bytes; every rank draws the same global batch.
text = torch.tensor(list(Path(__file__).parent.joinpath("gpt2.py").read_bytes()))
g = torch.Generator().manual_seed(0)
for step in range(1, 21):
    starts = torch.randint(0, len(text) - 33, (8,), generator=g)
    batch = torch.stack([text[s:s + 33] for s in starts]).chunk(2)[mesh.index("dp")]  # this replica's rows
    loss = model.step(batch[:, :-1], batch[:, 1:])
    if int(os.environ.get("RANK", 0)) == 0 and step % 5 == 0:
        print(f"step {step} loss {loss:.4f}", flush=True)
mesh.destroy()
torch.distributed.destroy_process_group()
