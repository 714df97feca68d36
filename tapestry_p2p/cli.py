"""`tapestry` command line: argument parsing, config files, signals and friendly errors. Knows nothing about tensors.

Every mistake a user can make on the command line ends as one line on stderr that names the fix, exit status 2, and
no traceback. Config files (`--config partner.toml`) hold the same options as the flags, with `-` spelled `_`; flags
given on the command line win.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")  # hivemind logs through its own handler; keep the terminal ours

from tapestry_p2p import BOOTSTRAP_PORT, UserError  # noqa: E402 (after the environment is set up for hivemind)

EXIT_USAGE = 2
DEFAULT_BOOTSTRAP_IDENTITY = Path.home() / ".tapestry" / "bootstrap.key"

logger = logging.getLogger("tapestry_p2p")


class UsageError(UserError):
    """A mistake in the command line or a config file; the message names the fix."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line with the fix instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> Parser:
    parser = Parser(prog="tapestry", description="Train one model together, peer to peer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    boot = sub.add_parser("bootstrap", help="run a DHT node that helps peers find each other")
    boot.add_argument(
        "--listen",
        nargs="+",
        metavar="MADDR",
        default=[f"/ip4/0.0.0.0/tcp/{BOOTSTRAP_PORT}"],
        help=f"addresses to listen on (default: all IPv4 interfaces, TCP port {BOOTSTRAP_PORT})",
    )
    boot.add_argument(
        "--announce", nargs="+", metavar="MADDR", default=[], help="public addresses to advertise, e.g. behind NAT"
    )
    boot.add_argument(
        "--identity",
        type=Path,
        default=DEFAULT_BOOTSTRAP_IDENTITY,
        help=f"private key file, created on first run (default: {DEFAULT_BOOTSTRAP_IDENTITY})",
    )
    boot.add_argument(
        "--initial-peers", nargs="+", metavar="MADDR", default=[], help="other bootstrap nodes of the same swarm"
    )
    boot.add_argument("--addr-file", type=Path, help="write our full multiaddrs here, one per line, once ready")
    boot.add_argument("--run-id", default="tapestry", help="the run whose peer table lists this node")
    boot.add_argument("--partner", default="bootstrap", help="name shown in the peer table")
    boot.add_argument("--region", default="unknown", help="where this node runs, shown in the peer table")

    join = sub.add_parser("join", help="train with the swarm (or start a new one)")
    join.add_argument("--config", type=Path, help="TOML file with any of the options below (flags win)")
    join.add_argument(
        "--initial-peers",
        nargs="+",
        metavar="MADDR",
        default=[],
        help="a bootstrap node's (or any peer's) full multiaddr; omit to start a new swarm",
    )
    join.add_argument("--run-id", default="tapestry", help="name of the training run; peers of one run average")
    join.add_argument("--data", type=Path, help="a .txt/.jsonl file or a folder of them (UTF-8)")
    join.add_argument("--identity", type=Path, help="private key file (default: a new identity each start)")
    join.add_argument(
        "--listen",
        nargs="+",
        metavar="MADDR",
        default=["/ip4/0.0.0.0/tcp/0"],
        help="addresses to listen on (default: all IPv4 interfaces, a free port)",
    )
    join.add_argument("--announce", nargs="+", metavar="MADDR", default=[], help="public addresses to advertise")
    join.add_argument("--checkpoint-dir", type=Path, help="write (and resume from) checkpoints here")
    join.add_argument("--inner-steps", type=positive_int, default=50, metavar="H", help="inner steps per round")
    join.add_argument("--max-rounds", type=positive_int, metavar="R", help="stop after R outer rounds")
    join.add_argument("--compression", choices=["8bit", "fp16", "none"], default="8bit", help="delta codec on the wire")
    join.add_argument("--metrics", type=Path, help="append one JSON line per outer round here")
    join.add_argument("--partner", default="partner", help="your organisation's name, shown to the swarm")
    join.add_argument("--region", default="unknown", help="where this node runs, shown to the swarm")
    join.add_argument(
        "--round-window",
        type=positive_float,
        default=4.0,
        metavar="SECONDS",
        help="how long the first peer to finish waits for the others",
    )
    join.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    join.add_argument("--quiet", action="store_true", help="no progress bar: one line per round only")
    join.add_argument(
        "--min-peers",
        type=positive_int,
        default=1,
        metavar="N",
        help="wait until N trainers (us included) are online before the first round",
    )
    join.add_argument(
        "--start-fresh",
        action="store_true",
        help="if the swarm is ahead of us and nobody serves its state, train from ours instead of waiting",
    )
    model = join.add_argument_group("model and optimizer")
    model.add_argument("--block-size", type=positive_int, default=64, help="context length in bytes")
    model.add_argument("--n-layer", type=positive_int, default=4)
    model.add_argument("--n-head", type=positive_int, default=4)
    model.add_argument("--n-embd", type=positive_int, default=128)
    model.add_argument("--batch-size", type=positive_int, default=16)
    model.add_argument("--lr", type=positive_float, default=3e-3, help="inner AdamW learning rate")
    model.add_argument("--outer-lr", type=positive_float, default=0.7, help="outer Nesterov SGD learning rate")
    model.add_argument("--outer-momentum", type=float, default=0.9)

    mon = sub.add_parser("monitor", help="live peer table of a run")
    mon.add_argument("--initial-peers", nargs="+", metavar="MADDR", required=True, help="any node of the swarm")
    mon.add_argument("--run-id", default="tapestry", help="the run to watch")
    mon.add_argument("--once", action="store_true", help="print one snapshot and exit")
    mon.add_argument("--json", action="store_true", help="print one snapshot as JSON (a list of peers) and exit")

    plot = sub.add_parser("plot", help="PNG of loss and bytes per round from --metrics files")
    plot.add_argument("metrics", nargs="+", type=Path, metavar="METRICS.jsonl")
    plot.add_argument("-o", "--output", type=Path, default=Path("tapestry-plot.png"), help="PNG file to write")

    demo = sub.add_parser("demo", help="a whole swarm on this machine: bootstrap + 3 partners, then a comparison")
    demo.add_argument("--rounds", type=positive_int, default=8, help="outer rounds per partner")
    demo.add_argument("--inner-steps", type=positive_int, default=30)
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path("tapestry-demo"),
        help="logs, metrics, checkpoints and the plot (default: ./tapestry-demo, emptied each run)",
    )
    return parser


def apply_config_file(parser: Parser, subparser_name: str, argv: Sequence[str]) -> None:
    """Load `--config FILE` for a subcommand and install its values as that subcommand's defaults."""
    if "--config" not in argv:
        return
    index = list(argv).index("--config")
    if index + 1 >= len(argv):
        raise UsageError("--config needs a file path")
    path = Path(argv[index + 1])
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--config: {path} does not exist; check the path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--config: {path} is not valid TOML ({e}); fix the file") from None
    sub = parser._subparsers._group_actions[0].choices[subparser_name]  # type: ignore[union-attr]
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    defaults: Dict[str, Any] = {}
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            known = ", ".join(sorted(actions))
            raise UsageError(f"--config: unknown key {key!r} in {path}; known keys: {known}")
        defaults[key] = _config_value(path, key, value, action)
    sub.set_defaults(**defaults)


def _config_value(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    if action.nargs == 0:  # a switch such as --quiet
        if not isinstance(value, bool):
            raise UsageError(f"--config: {key} in {path} must be true or false, not {value!r}")
        return value
    items = value if isinstance(value, list) else [value]
    if action.nargs is None and isinstance(value, list):
        raise UsageError(f"--config: {key} in {path} must be a single value, not a list")
    converted = []
    for item in items:
        if isinstance(item, (dict, list)) or isinstance(item, bool):
            raise UsageError(f"--config: {key} in {path} has a value of the wrong type: {item!r}")
        try:
            converted.append(action.type(str(item)) if action.type else str(item))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise UsageError(f"--config: {key} in {path}: {e}") from None
        if action.choices and converted[-1] not in action.choices:
            raise UsageError(f"--config: {key} in {path} must be one of {', '.join(action.choices)}")
    return converted if action.nargs else converted[0]


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        for noisy in ("hivemind", "asyncio", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def install_stop_handlers(stop) -> None:
    """First Ctrl-C / SIGTERM: finish or abandon the current round, then exit. Second Ctrl-C: exit now."""

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.info("stopping after the current round (Ctrl-C again to quit now)")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    import threading

    from tapestry_p2p.checkpoint import atomic_write
    from tapestry_p2p.node import RUN_ID_PATTERN
    from tapestry_p2p.swarm import (
        DHTOptions,
        check_ports_free,
        load_or_create_identity,
        parse_maddrs,
        start_dht,
        stop_dht,
        visible_maddrs,
    )
    from tapestry_p2p.telemetry import StatusPublisher, signing_key, validators

    if not RUN_ID_PATTERN.match(args.run_id):
        raise UsageError(f"--run-id {args.run_id!r} must be 1-64 letters, digits, '-' or '_'")
    if args.addr_file is not None and not args.addr_file.parent.is_dir():
        raise UsageError(f"--addr-file: folder {args.addr_file.parent} does not exist; create it first")
    listen = parse_maddrs(args.listen, option="--listen", need_peer_id=False)
    check_ports_free(listen)  # before anything is written to disk
    if args.identity == DEFAULT_BOOTSTRAP_IDENTITY:
        args.identity.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    load_or_create_identity(args.identity)
    key = signing_key(args.identity)
    options = DHTOptions(
        initial_peers=parse_maddrs(args.initial_peers, option="--initial-peers", need_peer_id=True),
        listen=listen,
        announce=parse_maddrs(args.announce, option="--announce", need_peer_id=False),
        identity=args.identity,
        record_validators=validators(args.run_id, key),
    )
    stop = threading.Event()
    install_stop_handlers(stop)
    dht = start_dht(options)
    peer_id = dht.peer_id.to_base58()
    fields = dict(peer_id=peer_id, partner=args.partner, region=args.region, role="bootstrap")
    status = StatusPublisher(dht, args.run_id, key, fields)
    try:
        status.start()
        addrs = visible_maddrs(dht)
        if args.addr_file is not None:
            atomic_write(args.addr_file, lambda tmp: Path(tmp).write_text("".join(a + "\n" for a in addrs)))
        console = _console()
        console.print(f"bootstrap node {peer_id} is up. Partners join with:")
        for addr in addrs:
            console.print(f"  tapestry join --initial-peers {addr} ...", soft_wrap=True)
        while not stop.wait(1.0):
            if not dht.is_alive():
                raise UsageError("the DHT process died; see the log above, then restart the bootstrap node")
    finally:
        status.stop()
        stop_dht(dht)
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from tapestry_p2p.node import Node

    if args.data is None:
        raise UsageError("tapestry join: --data is required: a .txt/.jsonl file or a folder of them")
    try:
        config = _node_config(args)
    except ValueError as e:  # the config dataclasses validate ranges
        raise UsageError(str(e)) from None
    if config.metrics is not None and not config.metrics.parent.is_dir():
        raise UsageError(f"--metrics: folder {config.metrics.parent} does not exist; create it first")
    console = _console()
    progress = _round_progress(console, disabled=args.quiet or not console.is_terminal)

    def report(record) -> None:
        alone = " (alone)" if record.group_size == 1 else ""
        progress.console.print(
            f"round {record.round:4d}  loss {record.loss:6.3f}  group {record.group_size}{alone}  "
            f"sent {record.bytes_sent / 1e6:6.2f} MB  recv {record.bytes_received / 1e6:6.2f} MB  "
            f"{record.round_seconds:5.1f}s  model {record.model_hash}"
            + (f"  [yellow]{record.failure}[/]" if record.failure else ""),
            soft_wrap=True,
        )
        progress.reset(task, description=f"round {record.round + 1}")

    def step(done: int, target: int) -> None:
        progress.update(task, completed=min(done, target))

    node = Node(config, on_round=report, on_step=step)
    task = progress.add_task(f"round {node.shared.round + 1}", total=args.inner_steps)
    install_stop_handlers(node.stop)
    with progress:
        summary = node.run()
    console.print(summary.line(), soft_wrap=True)
    return 0


def _round_progress(console, disabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("inner steps"))
    return Progress(*columns, TimeElapsedColumn(), console=console, disable=disabled, transient=True)


def _node_config(args: argparse.Namespace):
    from tapestry_p2p.model import ModelConfig
    from tapestry_p2p.node import NodeConfig
    from tapestry_p2p.outer import OuterConfig
    from tapestry_p2p.rounds import RoundSchedule
    from tapestry_p2p.swarm import parse_maddrs
    from tapestry_p2p.train import TrainConfig

    return NodeConfig(
        run_id=args.run_id,
        data=args.data,
        initial_peers=parse_maddrs(args.initial_peers, option="--initial-peers", need_peer_id=True),
        listen=parse_maddrs(args.listen, option="--listen", need_peer_id=False),
        announce=parse_maddrs(args.announce, option="--announce", need_peer_id=False),
        identity=args.identity,
        checkpoint_dir=args.checkpoint_dir,
        metrics=args.metrics,
        partner=args.partner,
        region=args.region,
        inner_steps=args.inner_steps,
        max_rounds=args.max_rounds,
        min_peers=args.min_peers,
        start_fresh=args.start_fresh,
        compression=args.compression,
        threads=args.threads or 0,
        model=ModelConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd),
        train=TrainConfig(batch_size=args.batch_size, lr=args.lr),
        outer=OuterConfig(lr=args.outer_lr, momentum=args.outer_momentum),
        schedule=RoundSchedule(window=args.round_window),
    )


def cmd_monitor(args: argparse.Namespace) -> int:
    from hivemind.utils import get_dht_time

    from tapestry_p2p.monitor import MonitorConfig, monitor_dht, render, run_live, snapshot, snapshot_json
    from tapestry_p2p.swarm import parse_maddrs

    config = MonitorConfig(parse_maddrs(args.initial_peers, option="--initial-peers", need_peer_id=True), args.run_id)
    console = _console()
    with monitor_dht(config) as dht:
        if args.json:
            print(snapshot_json(snapshot(dht, args.run_id)))
        elif args.once:
            console.print(render(snapshot(dht, args.run_id), get_dht_time(), f"tapestry swarm '{args.run_id}'"))
        else:
            try:
                run_live(dht, args.run_id, console)
            except KeyboardInterrupt:
                pass
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from tapestry_p2p.plot import plot

    if not args.output.parent.is_dir():
        raise UsageError(f"--output: folder {args.output.parent} does not exist; create it first")
    _console().print(f"wrote {plot(args.metrics, args.output)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tapestry_p2p.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(rounds=args.rounds, inner_steps=args.inner_steps, workdir=args.workdir), _console())


COMMANDS = {
    "bootstrap": cmd_bootstrap,
    "join": cmd_join,
    "monitor": cmd_monitor,
    "plot": cmd_plot,
    "demo": cmd_demo,
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        if argv and argv[0] in COMMANDS:
            apply_config_file(parser, argv[0], argv)
        args = parser.parse_args(argv)
        setup_logging(args.verbose)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        if os.environ.get("TAPESTRY_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
