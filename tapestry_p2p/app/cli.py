"""`tapestry` command line: argument parsing, config files, signals and friendly errors. Knows nothing about tensors.

Every mistake a user can make on the command line ends as one line on stderr that names the fix, exit status 2, and
no traceback. Defaults come from the config dataclasses (`node.config`). Config files (`--config partner.toml`) hold
the same options as the flags, with `-` spelled `_`, at the top level or in the sections of `NodeConfig`
(`[model] n_layer = 4`, `[train] lr = 3e-3`, `[outer] momentum = 0.9`, `[schedule] window = 4`); flags given on the
command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import tomllib
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Optional

from tapestry_p2p.errors import UserError
from tapestry_p2p.p2p import hivemind_compat

EXIT_USAGE = 2

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


def checkpoint_every(text: str) -> tuple[int, float]:
    """`N` rounds or `Tm` minutes, as (rounds, minutes)."""
    try:
        if text.endswith("m"):
            minutes = float(text[:-1])
            if minutes > 0:
                return 0, minutes
        elif int(text) > 0:
            return int(text), 0.0
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is neither a number of rounds (5) nor of minutes (10m)")


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

    def error(self, message: str) -> Any:  # argparse's NoReturn; raising is what it expects
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# `join` flags whose values live in a section of NodeConfig: flag dest -> (section, field). The other `join` flags are
# NodeConfig's own fields of the same name.
SECTION_FLAGS: dict[str, tuple[str, str]] = {
    "block_size": ("model", "block_size"),
    "n_layer": ("model", "n_layer"),
    "n_head": ("model", "n_head"),
    "n_embd": ("model", "n_embd"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "outer_lr": ("outer", "lr"),
    "outer_momentum": ("outer", "momentum"),
    "round_window": ("schedule", "window"),
}


def _section_classes() -> dict[str, Any]:
    """NodeConfig's sections that flags set: name -> its dataclass (the field's default factory)."""
    from tapestry_p2p.node.config import NodeConfig

    sections = {section for section, _ in SECTION_FLAGS.values()}
    return {f.name: f.default_factory for f in dataclasses.fields(NodeConfig) if f.name in sections}


def default(dest: str) -> Any:
    """The default of a `join` flag, from the config dataclass that owns it."""
    from tapestry_p2p.node.config import NodeConfig

    owner: Any = NodeConfig
    name = dest
    if dest in SECTION_FLAGS:
        section, name = SECTION_FLAGS[dest]
        owner = _section_classes()[section]
    found = next(f for f in dataclasses.fields(owner) if f.name == name)
    if found.default_factory is not dataclasses.MISSING:
        return found.default_factory()
    return found.default


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The parser, and each subcommand's parser by name (config files set their defaults)."""
    parser = Parser(prog="tapestry", description="Train one model together, peer to peer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    subparsers = {
        "bootstrap": _add_bootstrap(
            sub.add_parser("bootstrap", help="run a DHT node that helps peers find each other")
        ),
        "join": _add_join(sub.add_parser("join", help="train with the swarm (or start a new one)")),
        "monitor": _add_monitor(sub.add_parser("monitor", help="live peer table of a run")),
        "identity": _add_identity(sub.add_parser("identity", help="create or show a node's key and its public id")),
        "consortium": _add_consortium(
            sub.add_parser(
                "consortium", help="create, extend, sign, verify a consortium file (members only), or pin its run spec"
            )
        ),
        "spec": _add_spec(sub.add_parser("spec", help="write a run spec template, or show a spec's digest")),
        "eval": _add_eval(sub.add_parser("eval", help="held-out loss of a checkpoint's shared model, per corpus")),
        "export": _add_export(
            sub.add_parser("export", help="write a checkpoint's shared model as a Hugging Face model directory")
        ),
        "plot": _add_plot(sub.add_parser("plot", help="PNG of loss and bytes per round from --metrics files")),
        "demo": _add_demo(
            sub.add_parser("demo", help="a whole swarm on this machine: bootstrap + 3 partners, then a comparison")
        ),
    }
    return parser, subparsers


def _add_bootstrap(boot: Parser) -> Parser:
    from tapestry_p2p.app.bootstrap import DEFAULT_IDENTITY
    from tapestry_p2p.node.config import DEFAULT_RUN_ID
    from tapestry_p2p.p2p.addresses import BOOTSTRAP_PORT, DEFAULT_BOOTSTRAP_LISTEN

    boot.add_argument(
        "--listen",
        nargs="+",
        metavar="MADDR",
        default=list(DEFAULT_BOOTSTRAP_LISTEN),
        help=f"addresses to listen on (default: all IPv4 interfaces, TCP port {BOOTSTRAP_PORT})",
    )
    boot.add_argument(
        "--announce", nargs="+", metavar="MADDR", default=[], help="public addresses to advertise, e.g. behind NAT"
    )
    boot.add_argument(
        "--identity",
        type=Path,
        default=DEFAULT_IDENTITY,
        help=f"private key file, created on first run (default: {DEFAULT_IDENTITY})",
    )
    boot.add_argument(
        "--initial-peers", nargs="+", metavar="MADDR", default=[], help="other bootstrap nodes of the same swarm"
    )
    boot.add_argument("--addr-file", type=Path, help="write our full multiaddrs here, one per line, once ready")
    boot.add_argument("--run-id", default=DEFAULT_RUN_ID, help="the run whose peer table lists this node")
    boot.add_argument("--consortium", type=Path, help="consortium file: serve its members only (default: open)")
    boot.add_argument("--partner", default="bootstrap", help="name shown in the peer table")
    boot.add_argument("--region", default="unknown", help="where this node runs, shown in the peer table")
    return boot


def _add_join(join: Parser) -> Parser:
    from tapestry_p2p.comm.codec import CODECS

    join.add_argument("--config", type=Path, help="TOML file with any of the options below (flags win)")
    join.add_argument(
        "--initial-peers",
        nargs="+",
        metavar="MADDR",
        default=default("initial_peers"),
        help="a bootstrap node's (or any peer's) full multiaddr; omit to start a new swarm",
    )
    join.add_argument(
        "--run-spec",
        type=Path,
        help="the run spec every partner shares (model, tokenizer, optimizers, H, codec); see `tapestry spec init`",
    )
    join.add_argument("--run-id", default=default("run_id"), help="name of the training run; peers of one run average")
    join.add_argument(
        "--data", type=Path, help="a .txt/.jsonl/.parquet file, a folder of them, or a saved `datasets` directory"
    )
    join.add_argument(
        "--text-field", default=default("text_field"), help="the text column of .jsonl/.parquet files and datasets"
    )
    join.add_argument(
        "--device", default=default("device"), help="where the inner steps run: auto, cpu, cuda or cuda:N (default cpu)"
    )
    join.add_argument(
        "--grad-accum",
        type=positive_int,
        default=default("grad_accum"),
        metavar="K",
        help="split each batch into K micro-batches (less memory, the same batch size)",
    )
    join.add_argument("--identity", type=Path, help="private key file (default: a new identity each start)")
    join.add_argument(
        "--consortium", type=Path, help="consortium file: train with its members only (needs --identity; default: open)"
    )
    join.add_argument(
        "--listen",
        nargs="+",
        metavar="MADDR",
        default=default("listen"),
        help="addresses to listen on (default: all IPv4 interfaces, a free port)",
    )
    join.add_argument("--announce", nargs="+", metavar="MADDR", default=[], help="public addresses to advertise")
    join.add_argument("--checkpoint-dir", type=Path, help="write (and resume from) checkpoints here")
    join.add_argument(
        "--checkpoint-every",
        type=checkpoint_every,
        default=(1, 0.0),
        metavar="N|Tm",
        help="checkpoint after every N rounds (default 1), or every T minutes (e.g. 10m); always on stop",
    )
    join.add_argument(
        "--keep-checkpoints",
        type=int,
        default=default("keep_checkpoints"),
        metavar="K",
        help="keep the last K rounds in <checkpoint-dir>/history, to roll back a bad round (0: none)",
    )
    join.add_argument(
        "--clip-multiple",
        type=positive_float,
        default=default("clip_multiple"),
        metavar="K",
        help="clip each groupmate's update to K x the group's median norm",
    )
    join.add_argument(
        "--inner-steps", type=positive_int, default=default("inner_steps"), metavar="H", help="inner steps per round"
    )
    join.add_argument("--max-rounds", type=positive_int, metavar="R", help="stop after R outer rounds")
    join.add_argument("--compression", choices=CODECS, default=default("compression"), help="delta codec on the wire")
    join.add_argument("--metrics", type=Path, help="append one JSON line per outer round here")
    join.add_argument("--partner", default=default("partner"), help="your organisation's name, shown to the swarm")
    join.add_argument("--region", default=default("region"), help="where this node runs, shown to the swarm")
    join.add_argument(
        "--round-window",
        type=positive_float,
        default=default("round_window"),
        metavar="SECONDS",
        help="how long the first peer to finish waits for the others",
    )
    join.add_argument(
        "--threads", type=positive_int, default=default("threads"), help="torch CPU threads (default: torch's choice)"
    )
    join.add_argument("--quiet", action="store_true", help="no progress bar: one line per round only")
    join.add_argument(
        "--min-peers",
        type=positive_int,
        default=default("min_peers"),
        metavar="N",
        help="wait until N trainers (us included) are online before the first round",
    )
    join.add_argument(
        "--start-fresh",
        action="store_true",
        help="if the swarm is ahead of us and nobody serves its state, train from ours instead of waiting",
    )
    join.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="average each round in the background while training the next; its outer update applies one round "
        "late (the default; docs/ARCHITECTURE.md, node/overlap.py). --no-overlap: every partner waits for each "
        "round's all-reduce (DiLoCo's blocking rounds)",
    )
    _add_model_options(join)
    return join


def _add_model_options(join: Parser) -> None:
    model = join.add_argument_group("model and optimizer ([model], [train], [outer] in a config file)")
    model.add_argument("--block-size", type=positive_int, default=default("block_size"), help="context length in bytes")
    for flag in ("--n-layer", "--n-head", "--n-embd", "--batch-size"):
        model.add_argument(flag, type=positive_int, default=default(flag[2:].replace("-", "_")))
    model.add_argument("--lr", type=positive_float, default=default("lr"), help="inner AdamW learning rate")
    model.add_argument("--outer-lr", type=positive_float, default=default("outer_lr"), help="outer Nesterov SGD lr")
    model.add_argument("--outer-momentum", type=float, default=default("outer_momentum"))


def _add_monitor(mon: Parser) -> Parser:
    from tapestry_p2p.node.config import DEFAULT_RUN_ID

    mon.add_argument("--initial-peers", nargs="+", metavar="MADDR", required=True, help="any node of the swarm")
    mon.add_argument("--run-id", default=DEFAULT_RUN_ID, help="the run to watch")
    mon.add_argument("--consortium", type=Path, help="consortium file of the run (needs --identity of a member node)")
    mon.add_argument("--identity", type=Path, help="this monitor's key file, listed in the consortium file")
    mon.add_argument("--once", action="store_true", help="print one snapshot and exit")
    mon.add_argument("--json", action="store_true", help="print one snapshot as JSON (a list of peers) and exit")
    return mon


def _add_identity(ident: Parser) -> Parser:
    ident.add_argument("--identity", type=Path, required=True, help="private key file, created if it is missing")
    return ident


def _add_consortium(cons: Parser) -> Parser:
    actions = cons.add_subparsers(dest="action", required=True, parser_class=Parser)
    create = actions.add_parser("create", help="a new consortium file (version 1, no members yet)")
    create.add_argument("file", type=Path)
    create.add_argument("--run-id", required=True, help="the run this consortium trains")
    add = actions.add_parser("add", help="add a node (and its partner, if new); a signed file becomes a new version")
    add.add_argument("file", type=Path)
    add.add_argument("--partner", required=True, help="the partner's name, as every peer table will show it")
    add.add_argument("--node", required=True, help="the node's public key, as `tapestry identity` prints it")
    pin = actions.add_parser("pin-spec", help="require members to train one run spec (a new version if signed)")
    pin.add_argument("file", type=Path)
    pin.add_argument("--digest", required=True, help="the run spec's digest, as `tapestry spec show` prints it")
    sign = actions.add_parser("sign", help="sign the file with one of your member nodes' keys")
    sign.add_argument("file", type=Path)
    sign.add_argument("--identity", type=Path, required=True, help="a member node's key file")
    verify = actions.add_parser("verify", help="check the signatures (and that it follows --previous)")
    verify.add_argument("file", type=Path)
    verify.add_argument("--previous", type=Path, help="the version it replaces")
    return cons


def _add_spec(spec: Parser) -> Parser:
    actions = spec.add_subparsers(dest="action", required=True, parser_class=Parser)
    init = actions.add_parser("init", help="write a commented run spec template")
    init.add_argument("file", type=Path)
    init.add_argument("--run-id", required=True, help="the run's name")
    show = actions.add_parser("show", help="print the spec's digest (partners compare it) and the initial model's hash")
    show.add_argument("file", type=Path)
    return spec


def _add_eval(ev: Parser) -> Parser:
    ev.add_argument("--checkpoint-dir", type=Path, required=True, help="a node's --checkpoint-dir")
    ev.add_argument("--data", type=Path, nargs="+", required=True, help="held-out corpora (files, folders, datasets)")
    ev.add_argument("--text-field", default="text", help="the text column of .jsonl/.parquet files and datasets")
    return ev


def _add_export(ex: Parser) -> Parser:
    ex.add_argument("--checkpoint-dir", type=Path, required=True, help="a node's --checkpoint-dir")
    ex.add_argument("--out", type=Path, required=True, help="the model directory to write (must not exist)")
    return ex


def _add_plot(plot: Parser) -> Parser:
    plot.add_argument("metrics", nargs="+", type=Path, metavar="METRICS.jsonl")
    plot.add_argument("-o", "--output", type=Path, default=Path("tapestry-plot.png"), help="PNG file to write")
    return plot


def _add_demo(demo: Parser) -> Parser:
    from tapestry_p2p.app.demo import DemoConfig

    defaults = DemoConfig()
    demo.add_argument("--rounds", type=positive_int, default=defaults.rounds, help="outer rounds per partner")
    demo.add_argument("--inner-steps", type=positive_int, default=defaults.inner_steps)
    demo.add_argument(
        "--workdir",
        type=Path,
        default=defaults.workdir,
        help="logs, metrics, checkpoints and the plot (default: ./tapestry-demo, emptied each run)",
    )
    return demo


# ---- config files ----


def apply_config_file(subparser: Parser, argv: Sequence[str]) -> None:
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
    actions = {a.dest: a for a in subparser._actions if a.dest not in ("help", "config")}
    defaults: dict[str, Any] = {}
    for key, value in _flatten(path, values).items():
        action = actions.get(key)
        if action is None:
            known = ", ".join(sorted(actions))
            raise UsageError(f"--config: unknown key {key!r} in {path}; known keys: {known}")
        defaults[key] = _config_value(path, key, value, action)
    subparser.set_defaults(**defaults)


def _flatten(path: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys as they are; `[section] key` as the flag that sets that field (see SECTION_FLAGS)."""
    by_field = {target: dest for dest, target in SECTION_FLAGS.items()}
    sections = {section for section, _ in SECTION_FLAGS.values()}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key not in sections or not isinstance(value, dict):
            flat[key] = value
            continue
        for name, item in value.items():
            dest = by_field.get((key, name))
            if dest is None:
                known = ", ".join(sorted(n for s, n in SECTION_FLAGS.values() if s == key))
                raise UsageError(f"--config: unknown key {name!r} in [{key}] of {path}; known keys there: {known}")
            flat[dest] = item
    return flat


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
        if isinstance(item, (dict, list, bool)):
            raise UsageError(f"--config: {key} in {path} has a value of the wrong type: {item!r}")
        try:
            converted.append(action.type(str(item)) if callable(action.type) else str(item))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise UsageError(f"--config: {key} in {path}: {e}") from None
        if action.choices and converted[-1] not in action.choices:
            raise UsageError(f"--config: {key} in {path} must be one of {', '.join(map(str, action.choices))}")
    return converted if action.nargs else converted[0]


# ---- the terminal ----


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        for noisy in ("hivemind", "asyncio", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def install_stop_handlers(stop: threading.Event) -> None:
    """First Ctrl-C / SIGTERM: finish or abandon the current round, then exit. Second Ctrl-C: exit now."""

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.info("stopping after the current round (Ctrl-C again to quit now)")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# ---- commands ----


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from tapestry_p2p.app.bootstrap import BootstrapOptions, run_bootstrap_node
    from tapestry_p2p.node.config import RUN_ID_PATTERN, RUN_ID_RULE

    if not RUN_ID_PATTERN.match(args.run_id):
        raise UsageError(f"--run-id {args.run_id!r} {RUN_ID_RULE}")
    options = BootstrapOptions(
        listen=args.listen,
        announce=args.announce,
        identity=args.identity,
        initial_peers=args.initial_peers,
        addr_file=args.addr_file,
        run_id=_run_id(args),
        consortium=args.consortium,
        partner=args.partner,
        region=args.region,
    )
    stop = threading.Event()
    install_stop_handlers(stop)
    out = console()

    def announce(peer_id: str, addresses: list[str]) -> None:
        out.print(f"bootstrap node {peer_id} is up. Partners join with:")
        for addr in addresses:
            out.print(f"  tapestry join --initial-peers {addr} ...", soft_wrap=True)

    run_bootstrap_node(options, stop, announce)
    return 0


def cmd_join(args: argparse.Namespace, node_class: Optional[type] = None) -> int:
    from tapestry_p2p.app.join import run_join
    from tapestry_p2p.node.node import Node

    if args.data is None:
        raise UsageError("tapestry join: --data is required: a .txt/.jsonl/.parquet file, a folder, or a dataset")
    try:
        config = node_config(args)
    except ValueError as e:  # the config dataclasses validate ranges
        raise UsageError(str(e)) from None
    if config.metrics is not None and not config.metrics.parent.is_dir():
        raise UsageError(f"--metrics: folder {config.metrics.parent} does not exist; create it first")
    return run_join(config, console(), args.quiet, install_stop_handlers, node_class or Node)


def node_config(args: argparse.Namespace) -> Any:
    """The NodeConfig that `join`'s parsed flags describe (multiaddrs validated)."""
    from tapestry_p2p.node.config import NodeConfig
    from tapestry_p2p.p2p.addresses import parse_maddrs

    sections: dict[str, dict[str, Any]] = {name: {} for name in _section_classes()}
    for dest, (section, name) in SECTION_FLAGS.items():
        sections[section][name] = getattr(args, dest)
    built: dict[str, Any] = {name: cls(**sections[name]) for name, cls in _section_classes().items()}
    if args.run_spec is not None:
        shared = _spec_fields(args)
        for name in ("model", "train", "outer"):
            built[name] = shared.pop(name)
    else:
        shared = dict(run_id=_run_id(args), inner_steps=args.inner_steps, compression=args.compression)
    return NodeConfig(
        **shared,
        text_field=args.text_field,
        device=args.device,
        grad_accum=args.grad_accum,
        consortium=args.consortium,
        keep_checkpoints=args.keep_checkpoints,
        checkpoint_rounds=args.checkpoint_every[0],
        checkpoint_minutes=args.checkpoint_every[1],
        clip_multiple=args.clip_multiple,
        data=args.data,
        initial_peers=parse_maddrs(args.initial_peers, option="--initial-peers", need_peer_id=True),
        listen=parse_maddrs(args.listen, option="--listen", need_peer_id=False),
        announce=parse_maddrs(args.announce, option="--announce", need_peer_id=False),
        identity=args.identity,
        checkpoint_dir=args.checkpoint_dir,
        metrics=args.metrics,
        partner=args.partner,
        region=args.region,
        max_rounds=args.max_rounds,
        min_peers=args.min_peers,
        start_fresh=args.start_fresh,
        overlap=args.overlap,
        threads=args.threads,
        **built,
    )


# `join` flags a run spec fixes: given with --run-spec, they are an error rather than silently ignored.
SPEC_FLAGS = (
    "run_id",
    "inner_steps",
    "compression",
    *(d for d, (section, _) in SECTION_FLAGS.items() if section != "schedule"),
)


def _spec_fields(args: argparse.Namespace) -> dict[str, Any]:
    from tapestry_p2p.node.spec import config_fields

    for dest in SPEC_FLAGS:
        if getattr(args, dest) != default(dest):
            flag = "--" + dest.replace("_", "-")
            raise UsageError(
                f"{flag} is fixed by the run spec {args.run_spec}: remove it (every partner shares the spec's value)"
            )
    return config_fields(args.run_spec)


def _run_id(args: argparse.Namespace) -> str:
    """--run-id, or the consortium file's run when --run-id is left at its default."""
    from tapestry_p2p.node.config import DEFAULT_RUN_ID
    from tapestry_p2p.security.consortium import load

    if args.consortium is None or args.run_id != DEFAULT_RUN_ID:
        return str(args.run_id)
    return load(args.consortium).run_id


def cmd_monitor(args: argparse.Namespace) -> int:
    from tapestry_p2p.app.monitor import watch
    from tapestry_p2p.p2p.addresses import parse_maddrs
    from tapestry_p2p.security.consortium import load

    peers = parse_maddrs(args.initial_peers, option="--initial-peers", need_peer_id=True)
    consortium = None
    if args.consortium is not None:
        if args.identity is None:
            raise UsageError("--consortium needs --identity: a key file the consortium lists for this monitor")
        consortium = load(args.consortium)
    mode: Literal["live", "once", "json"] = "json" if args.json else "once" if args.once else "live"
    return watch(peers, _run_id(args), mode, console(), args.identity, consortium)


def cmd_identity(args: argparse.Namespace) -> int:
    from tapestry_p2p.security.identity import load_or_create_identity, public_key_line

    peer_id = load_or_create_identity(args.identity).to_base58()
    out = console()
    out.print(f"peer id:    {peer_id}", soft_wrap=True, markup=False)
    out.print(f"public key: {public_key_line(args.identity)}", soft_wrap=True, markup=False)
    out.print("To become a member, send the public key to a member of the consortium, who runs:", markup=False)
    out.print(
        f"  tapestry consortium add FILE --partner YOUR-NAME --node '{public_key_line(args.identity)}'",
        soft_wrap=True,
        markup=False,
    )
    return 0


def cmd_consortium(args: argparse.Namespace) -> int:
    from tapestry_p2p.app.consortium import run_consortium_command

    return run_consortium_command(args, console())


def cmd_plot(args: argparse.Namespace) -> int:
    from tapestry_p2p.app.plot import plot

    if not args.output.parent.is_dir():
        raise UsageError(f"--output: folder {args.output.parent} does not exist; create it first")
    console().print(f"wrote {plot(args.metrics, args.output)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tapestry_p2p.app.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(rounds=args.rounds, inner_steps=args.inner_steps, workdir=args.workdir), console())


def cmd_spec(args: argparse.Namespace) -> int:
    from tapestry_p2p.app.spec import init_spec, show_spec

    if args.action == "init":
        return init_spec(args.file, args.run_id, console())
    return show_spec(args.file, console())


def cmd_eval(args: argparse.Namespace) -> int:
    from tapestry_p2p.training.evaluation import held_out_losses

    losses = held_out_losses(args.checkpoint_dir, args.data, args.text_field)
    out = console()
    for path, loss in losses.items():
        out.print(f"{loss:.4f}  {path}", markup=False, highlight=False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tapestry_p2p.training.export import export

    kind = export(args.checkpoint_dir, args.out)
    console().print(f"wrote {kind} to {args.out}", markup=False, highlight=False)
    return 0


COMMANDS = {
    "bootstrap": cmd_bootstrap,
    "join": cmd_join,
    "monitor": cmd_monitor,
    "identity": cmd_identity,
    "consortium": cmd_consortium,
    "spec": cmd_spec,
    "eval": cmd_eval,
    "export": cmd_export,
    "plot": cmd_plot,
    "demo": cmd_demo,
}


def main(argv: Optional[list[str]] = None, node_class: Optional[type] = None) -> int:
    """The `tapestry` command; `node_class` is the Node subclass `join` runs (a seam for test programs only)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        hivemind_compat.install("main")
        parser, subparsers = build_parser()
        if argv and argv[0] in subparsers:
            apply_config_file(subparsers[argv[0]], argv)
        args = parser.parse_args(argv)
        setup_logging(args.verbose)
        if args.command == "join" and node_class is not None:
            return cmd_join(args, node_class)
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
