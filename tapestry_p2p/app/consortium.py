"""`tapestry consortium create|add|sign|verify`: editing a consortium file (format and rules: `security.consortium`).

A consortium starts as `create` (version 1, no members), gets its partners' nodes with `add`, then each partner signs
with `sign`; nodes start with it once a majority of partners signed. `pin-spec` records the digest of the run spec
(`tapestry spec show`) that members must train. After that, `add` on the signed file writes the
next version (no signatures yet), which a majority of the current partners sign; any running node that receives it
(from its own file or from a peer) adopts it without a restart.
"""

from __future__ import annotations

import argparse
from typing import Any

from tapestry_p2p.node.config import RUN_ID_PATTERN, RUN_ID_RULE
from tapestry_p2p.security.consortium import (
    Consortium,
    ConsortiumError,
    check_genesis,
    check_successor,
    load_draft,
    save,
)
from tapestry_p2p.security.identity import load_or_create_identity, signing_key


def run_consortium_command(args: argparse.Namespace, out: Any) -> int:
    if args.action == "create":
        if args.file.exists():
            raise ConsortiumError(f"{args.file} already exists; edit it with `tapestry consortium add`")
        if not RUN_ID_PATTERN.match(args.run_id):
            raise ConsortiumError(f"--run-id {args.run_id!r} {RUN_ID_RULE}")
        save(Consortium(args.run_id, 1), args.file)
        out.print(f"created {args.file} for run {args.run_id!r}; add partners' nodes with `tapestry consortium add`")
    elif args.action == "add":
        before = load_draft(args.file)
        after = before.with_member(args.partner, args.node)
        save(after, args.file)
        news = (
            "" if after.version == before.version else f" as version {after.version} (keep a copy of the previous one)"
        )
        out.print(
            f"added a node of {args.partner} to {args.file}{news}; it needs signatures of a majority", markup=False
        )
    elif args.action == "pin-spec":
        before = load_draft(args.file)
        after = before.with_spec(args.digest)
        save(after, args.file)
        news = "" if after.version == before.version else f" as version {after.version}"
        out.print(
            f"pinned run spec {args.digest} in {args.file}{news}; it needs signatures of a majority", markup=False
        )
    elif args.action == "sign":
        load_or_create_identity(args.identity)
        signed = load_draft(args.file).signed_by(signing_key(args.identity))
        save(signed, args.file)
        out.print(f"signed version {signed.version} of {args.file} ({len(signed.signatures)} signatures)", markup=False)
    else:
        _verify(args, out)
    return 0


def _verify(args: argparse.Namespace, out: Any) -> None:
    consortium = load_draft(args.file)
    if args.previous is not None:
        check_successor(load_draft(args.previous), consortium)
    elif consortium.version == 1:
        check_genesis(consortium, str(args.file))
    else:
        raise ConsortiumError(
            f"{args.file} is version {consortium.version}: pass --previous with the version it replaces"
        )
    # one line whatever the path's length (scripts read it)
    out.print(
        f"{args.file}: run {consortium.run_id!r}, version {consortium.version}, valid", markup=False, soft_wrap=True
    )
    if consortium.spec:
        out.print(f"  run spec pinned: {consortium.spec}", markup=False)
    for member in consortium.members:
        out.print(f"  {member.name}: {len(member.nodes)} node(s)", markup=False)
