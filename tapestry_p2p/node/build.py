"""A partner node's parts, built from its `NodeConfig`: the model and its shared copy, the data, the inner trainer,
error feedback, state sync, checkpoints and metrics, after the checks that what we would train is what the run agreed
on.

`build_parts(config)` is what `Node(config)` uses; a test builds its own `Parts` to run a node's rounds against fakes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from tapestry_p2p.comm.codec import LOSSLESS
from tapestry_p2p.comm.error_feedback import ErrorFeedback
from tapestry_p2p.node.config import NodeConfig
from tapestry_p2p.node.metrics import MetricsWriter
from tapestry_p2p.node.spec import SpecError, digest_of, encode
from tapestry_p2p.node.sync import StateSync
from tapestry_p2p.security.consortium import Consortium, ConsortiumError
from tapestry_p2p.security.consortium import load as load_consortium
from tapestry_p2p.telemetry.status import StatusPublisher
from tapestry_p2p.training.checkpoint import CheckpointManager, RunIdentity
from tapestry_p2p.training.data import TokenStream
from tapestry_p2p.training.distributed import PartnerGroup, launched_ranks
from tapestry_p2p.training.inner import InnerTrainer, resolve_device
from tapestry_p2p.training.model import build_model, check_vocabulary, tokenizer_of
from tapestry_p2p.training.outer import SharedModel
from tapestry_p2p.training.tokenizer import make_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class Parts:
    """What a node is made of; `lock` guards theta and the outer optimizer against the thread that serves them."""

    shared: SharedModel
    trainer: InnerTrainer
    sync: StateSync
    metrics: MetricsWriter
    lock: threading.Lock
    spec: bytes  # our run spec, canonical JSON (node.spec)
    spec_digest: str
    consortium: Optional[Consortium] = None
    feedback: Optional[ErrorFeedback] = None  # what our lossy-coded contributions still owe the swarm
    checkpoints: Optional[CheckpointManager] = None
    group: Optional[PartnerGroup] = None  # this partner's ranks under torchrun (None: one process)


def build_parts(config: NodeConfig) -> Parts:
    """Every part of a node, checked against what the run agreed on (its consortium, initial model and run spec)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    consortium = _consortium(config)
    shared = SharedModel(build_model(config.model, config.model_seed), config.outer)
    spec = encode(config.spec())
    spec_digest = check_agreement(config, consortium, shared.hash(), digest_of(spec))
    tokenizer = make_tokenizer(tokenizer_of(config.model))
    check_vocabulary(shared.model, tokenizer.vocab_size)
    ranks = launched_ranks()
    device = resolve_device(config.device, ranks.local_rank if ranks.world > 1 else None)
    if config.train.batch_size % (ranks.world * config.grad_accum):
        raise SpecError(
            f"the run's batch size {config.train.batch_size} does not split into {ranks.world} ranks x "
            f"--grad-accum {config.grad_accum}; pick a --grad-accum (or a number of ranks) that divides it"
        )
    per_rank = config.train.batch_size // ranks.world
    batches = TokenStream(
        config.data, tokenizer, config.model.block_size, per_rank, config.text_field, (ranks.rank, ranks.world)
    )
    working: torch.nn.Module = copy.deepcopy(shared.model).to(device)
    group = None if ranks.world == 1 else PartnerGroup(ranks, device)
    if group is not None:
        working = group.wrap(working)
        logger.info("rank %d of %d of this partner on %s", ranks.rank, ranks.world, device)
    trainer = InnerTrainer(
        working, batches, dataclasses.replace(config.train, batch_size=per_rank), device, config.grad_accum
    )
    lock = threading.Lock()
    lossy = config.compression not in LOSSLESS and not config.solo
    feedback = ErrorFeedback([p.shape for p in shared.params]) if lossy else None
    sync = StateSync(shared, trainer.model, lock)
    run = RunIdentity(config.run_id, consortium.consortium_id if consortium else "", shared.hash())
    checkpoints = (
        None
        if config.checkpoint_dir is None
        else CheckpointManager(
            config.checkpoint_dir, shared, trainer, config.model, lock, run, config.keep_checkpoints, feedback
        )
    )
    tokens_per_step = config.train.batch_size * config.model.block_size
    metrics = MetricsWriter(config.metrics, StatusPublisher.disabled(), tokens_per_step)
    return Parts(shared, trainer, sync, metrics, lock, spec, spec_digest, consortium, feedback, checkpoints, group)


def _consortium(config: NodeConfig) -> Optional[Consortium]:
    consortium = None if config.consortium is None else load_consortium(config.consortium)
    if consortium is not None and consortium.run_id != config.run_id:
        raise ConsortiumError(
            f"{config.consortium} is the consortium of run {consortium.run_id!r}, not {config.run_id!r}: "
            f"pass --run-id {consortium.run_id}"
        )
    return consortium


def check_agreement(config: NodeConfig, consortium: Optional[Consortium], initial: str, spec_digest: str) -> str:
    """That we start from the initial model the run spec pins and train the spec the consortium pins; returns the
    spec digest."""
    if config.initial_model and initial != config.initial_model:
        raise SpecError(
            f"our initial model hashes to {initial}, the run spec pins {config.initial_model}: "
            "use the model files the consortium agreed on (`tapestry spec show` prints the hash of yours)"
        )
    if consortium is not None and consortium.spec not in ("", spec_digest):
        raise ConsortiumError(
            f"{config.consortium} pins run spec {consortium.spec}, we train {spec_digest}: join with "
            "the run.toml the consortium agreed on (`tapestry spec show` prints a spec's digest)"
        )
    return spec_digest
