"""Configuration (node/config.py and the CLI's use of it): validation, defaults from one source, TOML sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapestry_p2p.app.cli import apply_config_file, build_parser, node_config
from tapestry_p2p.comm.matchmaking import RoundSchedule
from tapestry_p2p.node.config import NodeConfig
from tapestry_p2p.training.inner import TrainConfig
from tapestry_p2p.training.model import ModelConfig
from tapestry_p2p.training.outer import OuterConfig


@pytest.mark.parametrize(
    "make", [lambda: ModelConfig(n_embd=30, n_head=4), lambda: OuterConfig(momentum=1.0), lambda: OuterConfig(lr=0)]
)
def test_config_validation(make):
    with pytest.raises(ValueError):
        make()


def test_node_config_validation(tmp_path):
    with pytest.raises(ValueError, match="run id"):
        NodeConfig(run_id="has.dot", data=tmp_path)
    with pytest.raises(ValueError, match="inner steps"):
        NodeConfig(run_id="ok", data=tmp_path, inner_steps=0)


PEERS = Path(__file__).parents[2] / "peers"


@pytest.mark.parametrize("config_file", sorted(PEERS.glob("*.toml")))
def test_example_partner_configs_parse(config_file):
    spec = [] if "inner_steps" in config_file.read_text() else ["--run-spec", str(PEERS / "run-spec" / "run.toml")]
    config = parse_join("--config", str(config_file), *spec)
    assert config.run_id == "consortium-2026" and config.inner_steps == 100 and config.compression == "8bit"
    assert config.listen == ["/ip4/0.0.0.0/tcp/31340"]
    assert config.consortium is not None and config.consortium.name == "consortium.toml" and config.identity


def parse_join(*argv: str) -> NodeConfig:
    parser, subparsers = build_parser()
    apply_config_file(subparsers["join"], ["join", *argv])
    return node_config(parser.parse_args(["join", "--data", "x.txt", *argv]))


def test_cli_defaults_are_the_config_dataclasses_defaults():
    config = parse_join()
    assert config == NodeConfig(data=Path("x.txt"))
    assert (config.model, config.train, config.outer, config.schedule) == (
        ModelConfig(),
        TrainConfig(),
        OuterConfig(),
        RoundSchedule(),
    )


def test_config_file_sections_set_the_nested_configs(tmp_path):
    path = tmp_path / "partner.toml"
    path.write_text(
        'partner = "x"\n[model]\nn_layer = 2\n[train]\nlr = 0.01\n[outer]\nmomentum = 0.5\n[schedule]\nwindow = 6\n'
    )
    config = parse_join("--config", str(path), "--n-embd", "64")
    assert config.partner == "x" and config.model == ModelConfig(n_layer=2, n_embd=64)
    assert config.train.lr == 0.01 and config.outer.momentum == 0.5 and config.schedule.window == 6
