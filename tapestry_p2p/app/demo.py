"""`tapestry demo`: a bootstrap node and three partners on this machine, then the comparison that shows the point.

Each partner is a separate `tapestry join` process with its own language (see `corpus/`), talking over loopback.
When they are done, each partner's shared model is compared with a model trained alone on that partner's data with
the same number of inner steps (the same DiLoCo loop, no network), on every language's held-out text. Partners
never see the other languages' data, yet the shared model has learned them: that is the consortium's gain.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tapestry_p2p.app.monitor import monitor_session, render
from tapestry_p2p.app.plot import plot
from tapestry_p2p.errors import UserError
from tapestry_p2p.node.metrics import read_jsonl
from tapestry_p2p.p2p import hivemind_compat
from tapestry_p2p.p2p.dht import dht_time
from tapestry_p2p.testing.local_swarm import LOOPBACK, LocalSwarm, LocalSwarmError, last_line

CORPUS_DIR = Path(__file__).parent / "corpus"
RUN_ID = "demo"
MARKER = ".tapestry-demo"
HELD_OUT_FRACTION = 0.15
STARTUP_TIMEOUT = 60.0
STOP_GRACE = 20.0  # seconds a process gets to exit after SIGTERM before SIGKILL
Results = dict[str, dict[str, tuple[float, float]]]  # partner -> language -> (shared model's loss, trained alone)


class DemoError(UserError):
    """The demo could not complete; the message says which process failed and where its log is."""


@dataclass(frozen=True)
class DemoPartner:
    name: str
    language: str
    region: str


@dataclass
class DemoConfig:
    rounds: int = 8
    inner_steps: int = 30
    workdir: Path = Path("tapestry-demo")  # logs, metrics, checkpoints and the plot stay here for a look
    run_timeout: float = 240.0  # seconds for the swarm's rounds, after which the demo gives up
    partners: tuple[DemoPartner, ...] = (
        DemoPartner("north-lab", "en", "eu-west"),
        DemoPartner("sur-uni", "es", "sa-east"),
        DemoPartner("ost-gmbh", "de", "eu-central"),
    )


@dataclass
class DemoRun:
    config: DemoConfig
    workdir: Path
    swarm: LocalSwarm

    def partner_dir(self, partner: DemoPartner) -> Path:
        return self.workdir / partner.name


def split_corpus(language: str) -> tuple[bytes, bytes]:
    """(train, held-out): the held-out part is the last paragraphs, cut at a paragraph boundary."""
    text = (CORPUS_DIR / f"{language}.txt").read_text(encoding="utf-8")
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - HELD_OUT_FRACTION)))
    return text[:cut].encode("utf-8"), text[cut:].strip().encode("utf-8")


def start_bootstrap(run: DemoRun) -> str:
    try:
        return run.swarm.start_bootstrap("bootstrap", run_id=RUN_ID, timeout=STARTUP_TIMEOUT)
    except LocalSwarmError:
        raise DemoError(f"the bootstrap node did not start: {last_line(run.swarm.log_path('bootstrap'))}") from None


def start_partners(run: DemoRun, bootstrap_addr: str) -> None:
    for partner in run.config.partners:
        folder = run.partner_dir(partner)
        folder.mkdir(parents=True, exist_ok=True)
        train, _ = split_corpus(partner.language)
        (folder / "train.txt").write_bytes(train)
        options = {
            "--run-id": RUN_ID,
            "--initial-peers": bootstrap_addr,
            "--listen": LOOPBACK,
            "--data": folder / "train.txt",
            "--partner": partner.name,
            "--region": partner.region,
            "--max-rounds": run.config.rounds,
            "--inner-steps": run.config.inner_steps,
            "--checkpoint-dir": folder / "checkpoint",
            "--metrics": folder / "metrics.jsonl",
            "--threads": 1,
            "--round-window": 3,
            "--quiet": None,
            "--min-peers": len(run.config.partners),
        }
        args = ["join"] + [str(x) for option, value in options.items() for x in (option, value) if x is not None]
        run.swarm.start(partner.name, *args)


def wait_for_partners(run: DemoRun, bootstrap_addr: str, console: Console) -> None:
    """Show the live peer table (the one `tapestry monitor` shows) until every partner has exited."""
    partners = dict(zip((p.name for p in run.config.partners), run.swarm.started[1:], strict=True))
    deadline = time.monotonic() + run.config.run_timeout
    title = f"tapestry demo: {len(partners)} partners, 1 shared model, {run.config.rounds} rounds"
    with monitor_session([bootstrap_addr], RUN_ID) as session:
        with Live(console=console, auto_refresh=False) as live:
            while any(p.poll() is None for p in partners.values()):
                if time.monotonic() > deadline:
                    raise DemoError(f"the partners did not finish within {run.config.run_timeout:.0f}s")
                live.update(render(session.peers(), dht_time(), title), refresh=True)
                time.sleep(1.0)
        console.print()
    failed = [name for name, popen in partners.items() if popen.returncode != 0]
    if failed:
        name, code = failed[0], partners[failed[0]].returncode
        raise DemoError(f"partner {name} exited with {code}: {last_line(run.swarm.log_path(name))}")


def train_alone(partner: DemoPartner, folder: Path, steps_per_round: int, rounds: int) -> Path:
    """The baseline: the same DiLoCo loop on the partner's data alone, no network. Returns its checkpoint folder.
    Runs in a worker process of its own."""
    from tapestry_p2p.node.config import NodeConfig
    from tapestry_p2p.node.node import Node

    out = folder / "alone"
    config = NodeConfig(
        run_id=RUN_ID,
        data=folder / "train.txt",
        partner=partner.name,
        solo=True,
        threads=1,
        inner_steps=steps_per_round,
        max_rounds=rounds,
        checkpoint_dir=out,
    )
    Node(config).run()
    return out


def compare(run: DemoRun) -> Results:
    """partner -> language -> (shared model's held-out loss, trained-alone model's held-out loss)."""
    partners = run.config.partners
    steps = {p.name: read_jsonl(run.partner_dir(p) / "metrics.jsonl")[-1]["step"] for p in partners}
    rounds = run.config.rounds
    context = multiprocessing.get_context("spawn")
    # the log filters go in before the worker imports anything that imports bitsandbytes (unpickling `train_alone`
    # imports this module): the initializer runs first; one worker per partner (measured on 2 cores: no faster than
    # two workers, ~31 s for three 130-step baselines either way; more cores run them all at once)
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=len(partners), mp_context=context, initializer=hivemind_compat.install, initargs=("main",)
    ) as pool:
        jobs = {
            p.name: pool.submit(train_alone, p, run.partner_dir(p), math.ceil(steps[p.name] / rounds), rounds)
            for p in partners
        }
        alone_dirs = {name: job.result() for name, job in jobs.items()}
    from tapestry_p2p.training.evaluation import held_out_losses

    held_out = {}
    for p in partners:  # each language's held-out part, as a file `tapestry eval` reads
        held_out[p.language] = run.workdir / "held-out" / f"{p.language}.txt"
        held_out[p.language].parent.mkdir(exist_ok=True)
        held_out[p.language].write_bytes(split_corpus(p.language)[1])
    results = {}
    for p in partners:
        shared = held_out_losses(run.partner_dir(p) / "checkpoint", list(held_out.values()))
        alone = held_out_losses(alone_dirs[p.name], list(held_out.values()))
        results[p.name] = {lang: (shared[path], alone[path]) for lang, path in held_out.items()}
    return results


def results_table(run: DemoRun, results: Results) -> Table:
    languages = [p.language for p in run.config.partners]
    table = Table(
        title="held-out loss (nats/byte, lower is better): shared model / trained alone", title_justify="left"
    )
    table.add_column("partner (own language)")
    for lang in languages:
        table.add_column(lang, justify="right")
    for p in run.config.partners:
        cells = []
        for lang in languages:
            shared, alone = results[p.name][lang]
            cell = Text(f"{shared:.2f}", style="green" if shared < alone else "red")
            cells.append(cell.append(f" / {alone:.2f}", style="default"))
        table.add_row(f"{p.name} ({p.language})", *cells)
    return table


def consortium_wins(run: DemoRun, results: Results) -> bool:
    """Does every partner's shared model beat its trained-alone model on every language it never saw?"""
    return all(
        results[p.name][lang][0] < results[p.name][lang][1]
        for p in run.config.partners
        for lang in results[p.name]
        if lang != p.language
    )


def prepare_workdir(workdir: Path) -> Path:
    """An empty folder for this run; a folder left by an earlier demo (it has our marker file) is emptied first."""
    marker = workdir / MARKER
    if workdir.exists() and any(workdir.iterdir()):
        if not marker.exists():
            raise DemoError(f"--workdir {workdir} is not empty and not an earlier demo's folder; choose another one")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by `tapestry demo`; the next demo run empties this folder\n")
    return workdir


def run_demo(config: DemoConfig, console: Console) -> int:
    workdir = prepare_workdir(config.workdir)
    started = time.monotonic()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with LocalSwarm(workdir, stop_grace=STOP_GRACE) as swarm:
            run = DemoRun(config, workdir, swarm)
            console.print(
                f"starting a bootstrap node and {len(config.partners)} partners on 127.0.0.1 (logs in {workdir})"
            )
            bootstrap_addr = start_bootstrap(run)
            start_partners(run, bootstrap_addr)
            wait_for_partners(run, bootstrap_addr, console)
        hashes = {read_jsonl(run.partner_dir(p) / "metrics.jsonl")[-1]["model_hash"] for p in config.partners}
        console.print(
            f"swarm done in {time.monotonic() - started:.0f}s; final shared model hashes: {', '.join(sorted(hashes))}"
        )
        console.print("training each partner alone with the same number of inner steps, for comparison...")
        results = compare(run)
        console.print(results_table(run, results))
        if consortium_wins(run, results):
            console.print("every partner's shared model beats its trained-alone model on the languages it never saw.")
        else:
            console.print("[red]the shared model did not beat training alone on every unseen language this time.[/]")
        plot_file = plot([run.partner_dir(p) / "metrics.jsonl" for p in config.partners], workdir / "demo.png")
        console.print(f"loss and traffic per round plotted in {plot_file}")
        console.print(f"demo finished in {time.monotonic() - started:.0f}s")
        return 0 if consortium_wins(run, results) else 1
    finally:
        signal.signal(signal.SIGINT, previous)
