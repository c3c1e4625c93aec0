"""`meshpar cluster` (meshpar/cluster/): 2 hosts x 2 ranks as network namespaces joined by
200 Mbit/s links. A training run spans both hosts (gloo over their links, tp inside a
host); a host's link cut mid-step ends every rank within --comm-timeout plus a margin
with the watchdog's report; hosts whose restart counts differ meet again; `down` leaves
no namespace or interface, also after a killed `run`. Where this machine lacks root or
the `ip` and `tc` tools, the tests are skipped with the reason."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshpar.cluster import emulated

if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
    pytest.skip("the emulated cluster needs root and the ip and tc tools", allow_module_level=True)


def cluster(state, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshpar", "cluster", "--state", str(state), *args],
                          capture_output=True, text=True, timeout=kwargs.pop("timeout", 300), **kwargs)


def leftovers() -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [n for n in names.split() if n.startswith("mpt-")] + [line for line in links.splitlines() if "mpt-" in line]


@pytest.fixture
def hosts(tmp_path):
    """2 hosts x 2 ranks at 200 Mbit/s, removed afterwards whatever happened."""
    state = tmp_path / "cluster.json"
    emulated.up(2, 2, emulated.Link("200mbit"), state, prefix="mpt")
    yield state
    emulated.down(state)
    assert not leftovers()


def train(state, tmp_path, *flags) -> list[str]:
    tmp_path.mkdir(exist_ok=True)
    return ["run", "--port", "29531", "--", "meshpar", "train", "--dp", "2", "--tp", "2", "--seq-len", "64",
            "--no-progress", "--metrics-file", str(tmp_path / "metrics.jsonl"), *flags]


def test_a_run_spans_two_hosts_with_tp_inside_each(hosts, tmp_path):
    done = cluster(hosts, *train(hosts, tmp_path, "--steps", "3"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["placement"]["nodes"] == 2 and summary["placement"]["ranks_per_node"] == 2
    assert summary["placement"]["axes"]["tp"] == "inside a node" and "across" in summary["placement"]["axes"]["dp"]


def test_a_cut_link_ends_every_rank_with_the_watchdogs_report(hosts, tmp_path):
    timeout = 5
    run = subprocess.Popen([sys.executable, "-m", "meshpar", "cluster", "--state", str(hosts),
                            *train(hosts, tmp_path, "--steps", "100000", "--comm-timeout", str(timeout))],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # training is under way
        assert run.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.5)
    assert cluster(hosts, "link", "1", "down").returncode == 0
    cut = time.monotonic()
    out, err = run.communicate(timeout=timeout + 120)
    assert run.returncode != 0
    assert time.monotonic() - cut < timeout + 60  # the timeout plus torchrun's teardown
    assert "meshpar watchdog" in err and "--comm-timeout" in err, err[-3000:]


def test_hosts_meet_again_after_a_restart_only_one_of_them_counted(hosts, tmp_path):
    """Host 1's ranks fail while host 0's sleep: host 0's agent restarts its ranks for the
    rejoin without counting a restart, so the hosts' restart counts differ; the restarted
    job still meets (tests/rejoin_race.py) - each round at a fresh store. Rank 0 is on
    host 0 (hosts take ranks in their addresses' order), which counted no restart."""
    state = emulated.load(hosts)
    done = cluster(hosts, "run", "--port", "29535", "--max-restarts", "2", "--", "python",
                   str(Path(__file__).with_name("rejoin_race.py")), state.host(1), str(tmp_path), timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sum of ranks 6; restart count 0" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.slow  # 13 s; `down` after a normal run is checked by the fixture of the tests above
def test_down_cleans_up_after_a_killed_run(tmp_path):
    state = tmp_path / "cluster.json"
    assert cluster(state, "up", "--nodes", "2", "--ranks-per-node", "2", "--link", "200mbit",
                   "--prefix", "mpt").returncode == 0
    try:
        run = subprocess.Popen([sys.executable, "-m", "meshpar", "cluster", "--state", str(state),
                                *train(state, tmp_path, "--steps", "100000")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(5)
        run.send_signal(signal.SIGKILL)  # its hosts' torchruns and ranks live on in the namespaces
        run.wait()
    finally:
        done = cluster(state, "down")
    assert done.returncode == 0 and "removed" in done.stdout
    assert not leftovers() and not state.exists()


def metrics_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses_by_step(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "step_time_s" in r}


def restartable(hosts, tmp_path, name, steps, port) -> list[str]:
    """`cluster run --max-restarts 3` of a run that saves every 2 steps and resumes from
    its newest checkpoint when torchrun restarts it."""
    metrics = tmp_path / name / "metrics.jsonl"
    metrics.parent.mkdir()
    return ["run", "--port", str(port), "--max-restarts", "3", "--", "meshpar", "train", "--dp", "2", "--tp", "2",
            "--seq-len", "64", "--no-progress", "--metrics-file", str(metrics), "--steps", str(steps),
            "--save-dir", str(tmp_path / name / "checkpoints"), "--save-every", "2", "--resume",
            "--comm-timeout", "5"]


def wait_for_step(run, metrics, step: int, limit_s: float = 180):
    deadline = time.monotonic() + limit_s
    while not (metrics.exists() and max(losses_by_step(metrics_of(metrics)) or [0]) >= step):
        assert run.poll() is None, f"the run ended before step {step}: {run.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} in {limit_s} s"
        time.sleep(0.3)


@pytest.mark.slow  # ~1 minute each
@pytest.mark.timeout(900)
@pytest.mark.parametrize("fault", ["link cut and restored", "host 1's ranks killed"])
def test_a_restarted_job_resumes_with_the_losses_of_an_uninterrupted_run(hosts, tmp_path, fault):
    steps = 40  # long enough that the fault lands mid-run
    whole = cluster(hosts, *restartable(hosts, tmp_path, "whole", steps, 29533))
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = losses_by_step(metrics_of(tmp_path / "whole" / "metrics.jsonl"))

    metrics = tmp_path / "faulty" / "metrics.jsonl"
    run = subprocess.Popen([sys.executable, "-m", "meshpar", "cluster", "--state", str(hosts),
                            *restartable(hosts, tmp_path, "faulty", steps, 29534)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, metrics, 5)
    if fault == "link cut and restored":
        assert cluster(hosts, "link", "1", "down").returncode == 0
        time.sleep(12)  # past --comm-timeout: every rank gives up and torchrun restarts them
        assert cluster(hosts, "link", "1", "up").returncode == 0
    else:
        state = emulated.load(hosts)
        ranks = subprocess.run(["ip", "netns", "pids", state.host(1)], capture_output=True, text=True).stdout.split()
        workers = [pid for pid in ranks if "meshpar" in Path(f"/proc/{pid}/cmdline").read_text()
                   and "torch.distributed.run" not in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(int(pid), signal.SIGKILL)
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    # the resumed run keeps the file's steps up to its checkpoint and writes the rest again
    resumed = metrics_of(metrics)
    assert "resumed from" in resumed[-1]["started_from"], resumed[-1].get("started_from")
    assert losses_by_step(resumed) == expected and len(expected) == steps


@pytest.mark.slow  # ~30 s
def test_two_percent_packet_loss_changes_no_loss(tmp_path):
    """Every link dropping 2% of its packets (each way): TCP resends them, the losses are
    the same to the bit and the step time grows; both step times are printed."""
    runs = {}
    for name, link in (("clean", "200mbit"), ("lossy", "200mbit,,2%")):
        state = tmp_path / f"{name}.json"
        emulated.up(2, 2, emulated.Link.parse(link), state, prefix="mpt")
        try:
            done = cluster(state, *train(state, tmp_path / name, "--steps", "6"))
            assert done.returncode == 0, done.stderr[-3000:]
        finally:
            emulated.down(state)
        runs[name] = metrics_of(tmp_path / name / "metrics.jsonl")
    assert losses_by_step(runs["lossy"]) == losses_by_step(runs["clean"])
    step_s = {name: sorted(r["step_time_s"] for r in records if "step_time_s" in r)[3] for name, records in runs.items()}
    print(f"median step time: clean {step_s['clean']:.3f} s, 2% loss {step_s['lossy']:.3f} s")
