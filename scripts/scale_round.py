"""Everything around the inner steps, at a size that matters: two partners on loopback train a >= 100M-parameter
Llama-style model (random init, a few inner steps of a small batch per round) from one run spec, then a third joins
late and downloads the state.

North checkpoints after every round (as every node did before issue 9), south every 10 minutes
(`--checkpoint-every 10m`), so both settings are measured in the same run. Reports, per round and partner, the
seconds of each phase (the node's `seconds` metrics: inner steps, pseudo-gradient, update norm, hashing, copies into
and out of the averager, the all-reduce, outer step, re-sync, checkpoint write), the codec's share of the all-reduce
(the same codec timed here on the same number of values), each partner's peak resident memory against the model's
fp32 size, and the late joiner's download throughput.

    .venv/bin/python scripts/scale_round.py                 # ~110M parameters, 4 rounds of at least 2 inner steps
    .venv/bin/python scripts/scale_round.py --layers 2      # a quick look (~30M)

Prints a Markdown table (BENCHMARKS.md holds one run's output).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from tapestry_p2p.p2p import hivemind_compat  # (imports neither hivemind nor bitsandbytes)

hivemind_compat.install("main")  # first: their import-time warnings stay off the terminal

import psutil  # noqa: E402
import torch  # noqa: E402

from tapestry_p2p.comm.codec import compression_for  # noqa: E402
from tapestry_p2p.node.metrics import read_jsonl  # noqa: E402
from tapestry_p2p.testing.corpus import write_text  # noqa: E402
from tapestry_p2p.testing.local_swarm import LOOPBACK, LocalSwarm  # noqa: E402


def write_model(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    """A Llama-style config.json (no weights); returns the parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


class PeakMemory:
    """Samples a process and its children (DHT, averager, p2pd) every 0.2 s; keeps the peaks."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.main = self.tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                main = self.process.memory_info().rss
                tree = main + sum(c.memory_info().rss for c in self.process.children(recursive=True))
            except psutil.Error:
                return
            self.main, self.tree = max(self.main, main), max(self.tree, tree)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def codec_seconds(n_values: int, codec: str, repeat: int = 3) -> float:
    """Encode + decode of n_values float32 with the run's codec, best of `repeat` (one reducer's work per round is a
    share of this; the whole vector bounds it from above)."""
    from hivemind.compression import CompressionInfo, deserialize_torch_tensor

    values = torch.randn(n_values)
    compression = compression_for(codec)
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        wire = compression.compress(values, CompressionInfo.from_tensor(values), False)
        deserialize_torch_tensor(wire)
        best = min(best, time.perf_counter() - started)
    return best


def join_flags(root: Path, name: str, spec: Path, seed: int, rounds: int, boot: str, window: float) -> list[str]:
    folder = root / name
    folder.mkdir()
    return [
        "join",
        "--run-spec",
        str(spec),
        "--data",
        str(write_text(folder / "data.txt", seed, n_bytes=400_000)),
        "--listen",
        LOOPBACK,
        "--initial-peers",
        boot,
        "--partner",
        name,
        "--max-rounds",
        str(rounds),
        "--threads",
        "1",
        "--round-window",
        str(window),
        "--quiet",
        "--metrics",
        str(folder / "metrics.jsonl"),
        "--checkpoint-dir",
        str(folder / "ckpt"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--codec", default="8bit")
    parser.add_argument(
        "--south-checkpoint-every",
        default="10m",
        help="south's --checkpoint-every (north checkpoints after every round, the behaviour before issue 9)",
    )
    parser.add_argument(
        "--window", type=float, default=40.0, help="round window (s): longer than one inner step, or peers miss rounds"
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="tapestry-scale-"))
    params = write_model(root / "model", args.hidden, args.layers, args.vocab)
    fp32_bytes = params * 4
    spec = root / "run.toml"
    spec.write_text(
        f'run_id = "scale"\ninner_steps = {args.inner_steps}\ncompression = "{args.codec}"\n'
        f'[model]\nhuggingface = "model"\ntokenizer = "bytes"\nblock_size = {args.block_size}\n'
        f"[train]\nbatch_size = {args.batch_size}\nlr = 1e-4\n"
    )
    print(f"model: {params / 1e6:.1f}M parameters, {fp32_bytes / 1e9:.2f} GB in float32; workdir {root}", flush=True)
    with LocalSwarm(root, stop_grace=120) as swarm:
        boot = swarm.start_bootstrap(run_id="scale")
        procs, memory = {}, {}
        for i, name in enumerate(("north", "south")):
            every = ["--checkpoint-every", args.south_checkpoint_every] if name == "south" else []
            flags = join_flags(root, name, spec, i, args.rounds, boot, args.window)
            procs[name] = swarm.start(name, *flags, "--min-peers", "2", *every)
            memory[name] = PeakMemory(procs[name].pid)
        while not read_jsonl(root / "north" / "metrics.jsonl"):  # the late joiner comes after round 1
            if any(p.poll() is not None for p in procs.values()):
                sys.exit(f"a partner stopped early: {swarm.log('north')[-2000:]}\n{swarm.log('south')[-2000:]}")
            time.sleep(1)
        late = swarm.start("late", *join_flags(root, "late", spec, 7, 1, boot, args.window))
        for name, popen in [*procs.items(), ("late", late)]:
            popen.wait(timeout=3600)
            if popen.returncode != 0:
                sys.exit(f"{name} failed: {swarm.log(name)[-3000:]}")
        for tracker in memory.values():
            tracker.stop()
        late_log = swarm.log("late")
    report(root, args, params, fp32_bytes, memory, late_log)
    return 0


def report(root: Path, args: argparse.Namespace, params: int, fp32_bytes: int, memory: dict, late_log: str) -> None:
    records = {name: read_jsonl(root / name / "metrics.jsonl") for name in ("north", "south")}
    phases = ["inner", "pseudo_gradient", "norm", "hash", "copy_in", "wait", "allreduce", "copy_out", "outer_step"]
    phases += ["resync", "checkpoint", "catch_up"]
    codec = codec_seconds(params, args.codec)
    print(f"\n{params / 1e6:.1f}M parameters ({fp32_bytes / 1e6:.0f} MB fp32), {args.codec}, H={args.inner_steps}, ")
    print(f"batch {args.batch_size} x {args.block_size} tokens, 2 partners on loopback, 1 torch thread each\n")
    print("| partner | round | group | steps | s/step | " + " | ".join(phases) + " | overhead* |")
    print("|" + "---|" * (len(phases) + 6))
    overheads = []
    for name, rows in records.items():
        for r in rows:
            s = r["seconds"]
            overhead = sum(v for k, v in s.items() if k not in ("inner", "allreduce", "wait"))
            if r["round"] > 1:  # the first round includes one-time work (first hash, first checkpoint)
                overheads.append(overhead)
            cells = " | ".join(f"{s.get(k, 0.0):.2f}" for k in phases)
            per_step = s.get("inner", 0.0) / max(r["inner_steps"], 1)
            row = f"| {name} | {r['round']} | {r['group_size']} | {r['inner_steps']} | {per_step:.2f} | {cells}"
            print(f"{row} | {overhead:.2f} |")
    print("\n*overhead: everything but the inner steps and the all-reduce (matchmaking, codec and wire).")
    per_100m = statistics.median(overheads) / (params / 1e8) if overheads else float("nan")
    print(f"median overhead after round 1: {statistics.median(overheads):.2f} s = {per_100m:.2f} s per 100M parameters")
    print(f"codec (encode + decode of all {params / 1e6:.0f}M values, here): {codec:.2f} s")
    allreduce = [r["seconds"].get("allreduce", 0.0) for rows in records.values() for r in rows if r["group_size"] > 1]
    if allreduce:
        print(f"all-reduce median {statistics.median(allreduce):.2f} s (includes waiting for the slower partner)")
    for name, tracker in memory.items():
        print(
            f"peak RSS {name}: node process {tracker.main / 1e9:.2f} GB ({tracker.main / fp32_bytes:.1f}x fp32), "
            f"with its DHT/averager/p2pd children {tracker.tree / 1e9:.2f} GB ({tracker.tree / fp32_bytes:.1f}x; "
            "shared-memory buffers are counted once per process)"
        )
    found = re.search(r"downloaded ([\d.]+) MB from (\d+) peers in ([\d.]+)s \(([\d.]+) MB/s\)", late_log)
    if found:
        size, servers, seconds, rate = found.groups()
        print(f"late joiner: {size} MB from {servers} peers in {seconds} s = {rate} MB/s")
    else:
        print("late joiner: no download in its log (it found nobody ahead)")
    (root / "report.json").write_text(json.dumps({"params": params, "records": records}))


if __name__ == "__main__":
    sys.exit(main())
