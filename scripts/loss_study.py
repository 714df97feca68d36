"""What each communication choice costs in loss, on the demo task: codec x overlap x seeds, in one run.

Each run is the demo's swarm (a bootstrap and three partners on loopback, each on its own language's training split,
the demo's model and H) for a fixed number of rounds; afterwards the shared model (identical on every partner) is
evaluated on the three held-out splits, as `tapestry demo` does. Configurations: `--compression none | 8bit | 4bit`
(error feedback on for the lossy ones), each blocking and with `--overlap`. Seeds change the run id, hence the
initial model. Partners train until each meeting, so the number of inner steps (tokens) varies a little between
runs; the table reports it beside the loss.

    .venv/bin/python scripts/loss_study.py --seeds 1 2 3 --rounds 10
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
from pathlib import Path

from tapestry_p2p.p2p import hivemind_compat  # (imports neither hivemind nor bitsandbytes)

hivemind_compat.install("main")  # first: their import-time warnings stay off the terminal

from tapestry_p2p.app.demo import split_corpus  # noqa: E402
from tapestry_p2p.node.metrics import read_jsonl  # noqa: E402
from tapestry_p2p.testing.local_swarm import LOOPBACK, LocalSwarm  # noqa: E402
from tapestry_p2p.training.evaluation import held_out_losses  # noqa: E402

LANGUAGES = ("en", "es", "de")
CONFIGS = {  # name: extra flags
    "fp32": ("--compression", "none", "--no-overlap"),
    "8bit": ("--compression", "8bit", "--no-overlap"),
    "4bit+EF": ("--compression", "4bit", "--no-overlap"),
    "fp32 overlap": ("--compression", "none", "--overlap"),
    "8bit overlap": ("--compression", "8bit", "--overlap"),
    "4bit+EF overlap": ("--compression", "4bit", "--overlap"),
}


def one_run(workdir: Path, name: str, seed: int, args: argparse.Namespace, held_out: list[Path]) -> dict[str, float]:
    run = workdir / f"{name.replace(' ', '-')}-seed{seed}"
    run.mkdir()
    with LocalSwarm(run, stop_grace=30) as swarm:
        boot = swarm.start_bootstrap("boot")
        partners = {}
        for language in LANGUAGES:
            folder = run / language
            folder.mkdir()
            (folder / "train.txt").write_bytes(split_corpus(language)[0])
            partners[language] = swarm.start(
                language,
                "join",
                "--run-id",
                f"study-{seed}",
                "--initial-peers",
                boot,
                "--listen",
                LOOPBACK,
                "--data",
                str(folder / "train.txt"),
                "--max-rounds",
                str(args.rounds),
                "--inner-steps",
                str(args.inner_steps),
                "--round-window",
                "3",
                "--threads",
                "1",
                "--min-peers",
                str(len(LANGUAGES)),
                "--checkpoint-dir",
                str(folder / "ckpt"),
                "--metrics",
                str(folder / "metrics.jsonl"),
                "--quiet",
                *CONFIGS[name],
            )
        for language, popen in partners.items():
            if popen.wait(timeout=args.rounds * 60) != 0:
                raise SystemExit(f"{name} seed {seed}: partner {language} failed; see {swarm.log_path(language)}")
    records = {language: read_jsonl(run / language / "metrics.jsonl") for language in LANGUAGES}
    hashes = {rows[-1]["model_hash"] for rows in records.values()}
    losses = held_out_losses(run / LANGUAGES[0] / "ckpt", held_out)
    return {
        "loss": statistics.mean(losses.values()),
        "steps": sum(r["inner_steps"] for rows in records.values() for r in rows) / len(LANGUAGES),
        "bytes": statistics.mean(r["bytes_sent"] + r["bytes_received"] for rows in records.values() for r in rows[1:]),
        "one_model": float(len(hashes) == 1),
        "full_groups": statistics.mean(r["group_size"] == len(LANGUAGES) for rows in records.values() for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the swarm on SIGTERM too
    workdir = Path(tempfile.mkdtemp(prefix="tapestry-study-"))
    held_out = []
    for language in LANGUAGES:
        held_out.append(workdir / f"held-out-{language}.txt")
        held_out[-1].write_bytes(split_corpus(language)[1])
    print(f"runs in {workdir}", flush=True)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in args.configs}
    for seed in args.seeds:  # seeds outermost: a cut-short study still compares every configuration
        for name in args.configs:
            results[name].append(one_run(workdir, name, seed, args, held_out))
            print(f"{name} seed {seed}: {results[name][-1]}", flush=True)
    base = statistics.mean(r["loss"] for r in results[args.configs[0]])
    print(f"\n3 partners (en/es/de), {args.rounds} rounds, H = {args.inner_steps}, seeds {args.seeds}\n")
    print(
        "| configuration | held-out loss (mean of seeds) | spread (min..max) | vs "
        f"{args.configs[0]} | inner steps / partner | all-reduce bytes / round | one model | full groups |"
    )
    print("|---" * 8 + "|")
    for name, rows in results.items():
        losses = [r["loss"] for r in rows]
        mean_loss = statistics.mean(losses)
        steps, wire = (statistics.mean(r[key] for r in rows) for key in ("steps", "bytes"))
        one_model, full = (statistics.mean(r[key] for r in rows) for key in ("one_model", "full_groups"))
        print(
            f"| {name} | {mean_loss:.4f} | {min(losses):.4f}..{max(losses):.4f} | {mean_loss / base - 1:+.2%} "
            f"| {steps:.0f} | {wire / 1e6:.2f} MB | {one_model:.0%} | {full:.0%} |"
        )


if __name__ == "__main__":
    main()
