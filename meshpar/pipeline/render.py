"""A simulated schedule drawn as text (rank x time grid) or as a PNG timeline."""

from __future__ import annotations

from meshpar.pipeline.check import Simulation

_COLOURS = {"F": "#4c78a8", "B": "#e45756", "I": "#f58518", "W": "#54a24b"}


def text_grid(sim: Simulation, show_stage: bool) -> str:
    """One row per rank, one cell per time unit (the shortest compute action); '.' idle."""
    durations = [end - start for rank in sim.timeline for start, end, a in rank if a.is_compute and end > start]
    unit = min(durations) if durations else 1.0
    cells = max(1, round(sim.total_time / unit))
    width = max(len(_label(a, show_stage)) for rank in sim.timeline for _, _, a in rank if a.is_compute) + 1
    lines = []
    for r, rank in enumerate(sim.timeline):
        row = ["." * (width - 1)] * cells
        for start, end, a in rank:
            if a.is_compute:
                for c in range(round(start / unit), round(end / unit)):
                    row[c] = _label(a, show_stage)
        lines.append(f"rank {r} | " + " ".join(cell.rjust(width - 1) for cell in row))
    return "\n".join(lines)


def _label(action, show_stage: bool) -> str:
    return str(action) if show_stage else f"{action.kind}{action.microbatch}"


def save_png(sim: Simulation, title: str, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = len(sim.timeline)
    fig, ax = plt.subplots(figsize=(max(6, sim.total_time * 0.35), 0.6 * ranks + 1.2))
    for r, rank in enumerate(sim.timeline):
        for start, end, a in rank:
            if not a.is_compute:
                continue
            ax.broken_barh([(start, end - start)], (r - 0.4, 0.8), facecolors=_COLOURS[a.kind],
                           edgecolor="white")
            ax.text((start + end) / 2, r, str(a.microbatch), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(ranks), [f"rank {r}" for r in range(ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("time (cost units)")
    ax.set_title(f"{title}: bubble {sim.bubble_fraction:.1%} of {ranks} x {sim.total_time:g}")
    kinds = sorted({a.kind for rank in sim.timeline for _, _, a in rank if a.is_compute}, key="FBIW".index)
    ax.legend(handles=[Patch(color=_COLOURS[k], label=k) for k in kinds], loc="upper left",
              bbox_to_anchor=(1.01, 1), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
