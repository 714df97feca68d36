"""`tapestry plot`: loss curves and bytes per round from `--metrics` files, as one PNG for READMEs and reports."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tapestry_p2p.errors import UserError


class PlotError(UserError):
    """Unusable metrics input; the message names the file and the fix."""


def load_metrics(paths: Sequence[Path]) -> dict[str, list[dict]]:
    """partner name -> its round records, from one or more JSON Lines files."""
    runs: dict[str, list[dict]] = {}
    for path in paths:
        if not path.is_file():
            raise PlotError(f"{path} does not exist; pass the files written by `tapestry join --metrics`")
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = str(record["partner"])
                runs.setdefault(key, []).append(
                    {
                        "round": int(record["round"]),
                        "loss": record["loss"],
                        "mb": (int(record["bytes_sent"]) + int(record["bytes_received"])) / 1e6,
                    }
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise PlotError(f"{path}:{line_no} is not a tapestry metrics record; pass --metrics files") from None
    if not runs:
        raise PlotError("the metrics files hold no rounds yet; plot after the first round")
    return runs


def plot(paths: Sequence[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_metrics(paths)
    fig, (loss_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for partner, records in sorted(runs.items()):
        records = sorted(records, key=lambda r: r["round"])
        rounds = [r["round"] for r in records]
        loss_ax.plot(
            rounds, [r["loss"] if r["loss"] is not None else float("nan") for r in records], marker="o", label=partner
        )
        bytes_ax.plot(rounds, [r["mb"] for r in records], marker="o", label=partner)
    loss_ax.set(title="training loss (mean over the round's inner steps)", xlabel="outer round", ylabel="nats/byte")
    bytes_ax.set(title="all-reduce traffic per round (sent + received)", xlabel="outer round", ylabel="MB")
    bytes_ax.set_ylim(bottom=0)
    loss_ax.legend(loc="upper right")
    bytes_ax.legend(loc="lower right")
    for ax in (loss_ax, bytes_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
