"""`tapestry join` in the terminal: a progress bar of the round's inner steps, one line per round, a summary on stop.
The node itself (`node.Node`) knows nothing of the terminal; it reports through callbacks."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from tapestry_p2p.node.config import NodeConfig
from tapestry_p2p.node.metrics import RoundMetrics
from tapestry_p2p.node.node import Node
from tapestry_p2p.training.distributed import launched_ranks


def round_line(record: RoundMetrics) -> Text:
    """One round as the terminal shows it; the failure reason (from peers, too) is printed literally."""
    alone = " (alone)" if record.group_size == 1 else ""
    loss = f"{record.loss:6.3f}" if math.isfinite(record.loss) else "   n/a"  # n/a: no inner step this round
    line = Text(
        f"round {record.round:4d}  loss {loss}  group {record.group_size}{alone}  "
        f"sent {record.bytes_sent / 1e6:6.2f} MB  recv {record.bytes_received / 1e6:6.2f} MB  "
        f"{record.round_seconds:5.1f}s  model {record.model_hash}"
    )
    if record.failure:
        line.append(f"  {record.failure}", style="yellow")
    return line


def run_join(
    config: NodeConfig,
    console: Console,
    quiet: bool,
    install_stop_handlers: Callable[[threading.Event], Any],
    node_class: type[Node] = Node,
) -> int:
    """Run a node in the terminal until it stops; `node_class` is a seam for test programs (tests/faulty_join.py)."""
    progress = _round_progress(console, disabled=quiet or not console.is_terminal or launched_ranks().rank > 0)

    def report(record: RoundMetrics) -> None:
        progress.console.print(round_line(record), soft_wrap=True)
        progress.reset(task, description=f"round {record.round + 1}")

    def step(done: int, target: int) -> None:
        progress.update(task, completed=min(done, target))

    node = node_class(config, on_round=report, on_step=step)
    task = progress.add_task(f"round {node.shared.round + 1}", total=config.inner_steps)
    install_stop_handlers(node.stop)
    with progress:
        summary = node.run()
    if node.leader:
        console.print(summary.line(), soft_wrap=True)
    else:  # rank > 0 under torchrun: rank 0 prints the partner's rounds
        console.print(f"rank {launched_ranks().rank}: {summary.steps} inner steps led by rank 0", soft_wrap=True)
    return 0


def _round_progress(console: Console, disabled: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("inner steps"))
    return Progress(*columns, TimeElapsedColumn(), console=console, disable=disabled, transient=True)
