"""Run as `torchrun ... tests/kill_one_rank.py RANK:MOMENT:N train ARGS...`: meshpar's
command line, with rank RANK killed by SIGKILL on the job's first attempt
(TORCHELASTIC_RESTART_COUNT 0) - so a restarted job runs through:

    RANK:step:N   right after it finished step N (and its checkpoint, if one was due)
    RANK:save:N   while checkpoint N is being written: its own file on disk, the
                  checkpoint not yet published

Used by test_checkpoint.py's kill test; meshpar itself knows nothing of it."""

import os
import signal
import sys


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def inject(moment: str, n: int) -> None:
    from meshpar import durable
    from meshpar.checkpoint import store
    from meshpar.train.trainer import Trainer

    if moment == "step":
        train_step = Trainer.train_step

        def killing_train_step(self):
            if self.step == n:
                kill()
            return train_step(self)

        Trainer.train_step = killing_train_step
    elif moment == "save":
        write = durable.write_durably

        def killing_write(path, data):
            write(path, data)
            if path.parent.name == f".{store.step_dir_name(n)}.tmp" and path.name.startswith("rank-"):
                kill()

        durable.write_durably = killing_write
    else:
        raise SystemExit(f"{moment!r}: expected step or save")


if __name__ == "__main__":
    rank, moment, n = sys.argv[1].split(":")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ["RANK"] == rank:
        inject(moment, int(n))
    from meshpar.cli import main

    sys.exit(main(sys.argv[2:]))
