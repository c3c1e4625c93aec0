"""The same custom model (examples/gpt2.py) as a 2-stage pipeline, 1F1B over 4
micro-batches per step.

    torchrun --standalone --nproc-per-node=2 examples/pipeline_1f1b.py
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import meshpar  # noqa: E402
from gpt2 import GPT2, gpt2_plan  # noqa: E402

mesh = meshpar.init_mesh(pp=2)
model = meshpar.parallelize(GPT2(seed=0), mesh, gpt2_plan(), schedule="1f1b", microbatches=4, lr=1e-3)

text = torch.tensor(list(Path(__file__).parent.joinpath("gpt2.py").read_bytes()))
g = torch.Generator().manual_seed(0)
for step in range(1, 21):
    starts = torch.randint(0, len(text) - 33, (8,), generator=g)
    batch = torch.stack([text[s:s + 33] for s in starts])
    loss = model.step(batch[:, :-1], batch[:, 1:])  # every stage gets the batch; the last computes the loss
    if int(os.environ.get("RANK", 0)) == 0 and step % 5 == 0:
        print(f"step {step} loss {loss:.4f}", flush=True)
mesh.destroy()
torch.distributed.destroy_process_group()
