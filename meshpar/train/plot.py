"""Loss curves as PNG files (matplotlib without a display)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_losses(steps: list[dict], evals: list[dict], path: str | Path) -> str:
    """Training loss per step and validation loss per evaluation; returns the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss", linewidth=1)
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_runs(curves: dict[str, list[float]], path: str | Path, title: str = "") -> str:
    """Several runs' training loss per step, one line each; returns the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, evaluation records) of a metrics JSON-lines file."""
    import json

    steps, evals = [], []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ValueError(f"cannot read the metrics file {path}: {err.strerror}") from None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number} is not a JSON line") from None
        if "val_loss" in record and "summary" not in record:
            evals.append(record)
        elif "loss" in record and "step" in record:
            steps.append(record)
    if not steps:
        raise ValueError(f"{path} holds no training steps (is it a `meshpar train --metrics-file`?)")
    return steps, evals


def plot_metrics(steps: list[dict], evals: list[dict], path: str | Path) -> str:
    """Loss (training and validation), learning rate and throughput against the step."""
    plt = _pyplot()
    x = [s["step"] for s in steps]
    fig, (loss, lr, speed) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    loss.plot(x, [s["loss"] for s in steps], linewidth=1, label="train")
    if evals:
        loss.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation")
    loss.set_ylabel("loss (nats per token)")
    loss.legend()
    lr.plot([s["step"] for s in steps if s["lr"] is not None], [s["lr"] for s in steps if s["lr"] is not None])
    lr.set_ylabel("learning rate")
    speed.plot(x, [s["tokens_per_s"] for s in steps], linewidth=1)
    speed.set_ylabel("tokens/s")
    speed.set_xlabel("step")
    for ax in (loss, lr, speed):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_trace_timeline(directory: str | Path, path: str | Path) -> str:
    """The executed pipeline, from `--trace` files: one row per rank, its forward,
    backward (input and weight) passes and its waits on pipeline receives, on the common
    clock of the traces."""
    import json
    import re

    plt = _pyplot()
    files = sorted(Path(directory).glob("rank*.json"), key=lambda f: int(re.sub(r"\D", "", f.stem)))
    if not files:
        raise ValueError(f"{directory} holds no rank*.json traces (write them with `meshpar train --trace`)")
    colors = {"F": "tab:blue", "B": "tab:orange", "I": "tab:orange", "W": "tab:green", "wait": "lightgrey"}
    action = re.compile(r"^([FBIW]) stage (\d+) micro-batch (\d+)$")
    rows = []
    for f in files:
        events = json.loads(f.read_text())["traceEvents"]
        spans = []
        for e in events:
            name, dur = e.get("name", ""), e.get("dur")
            if dur is None:
                continue
            match = action.match(name)
            if match:
                spans.append((e["ts"], dur, match.group(1), match.group(3)))
            elif name == "recv pp activations":
                spans.append((e["ts"], dur, "wait", ""))
        rows.append(spans)
    start = min(s[0] for spans in rows for s in spans)
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(rows) + 1.5))
    for rank, spans in enumerate(rows):
        for ts, dur, kind, mb in spans:
            ax.barh(rank, dur / 1e3, left=(ts - start) / 1e3, color=colors[kind], edgecolor="black",
                    linewidth=0.3, height=0.7)
            if mb and dur / 1e3 > 2:
                ax.text((ts - start + dur / 2) / 1e3, rank, mb, ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(rows)), [f"rank {r}" for r in range(len(rows))])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms) - forward blue, backward orange, weight green, waiting on a receive grey")
    ax.set_title(f"executed pipeline, from {directory}")
    return _save(fig, path)
