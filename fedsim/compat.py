"""Which plug-ins fit together: the one place that checks a run's combination, before any Ray
process starts. Every refusal is one line that names the conflicting options and the fix.

What is refused is only what has no meaning (the README's compatibility table lists it):

- a strategy on a server loop it does not run on (`Capabilities.servers`): a server strategy on
  ``server=p2p``, a peer-to-peer strategy at a server, a stale-update step on ``server=sync``,
  VRLS's phases off ``server=sync``;
- a strategy that needs every node in every round under partial participation;
- uplink compression on ``server=p2p`` (members exchange whole models; there is no uplink);
- a line-searched attack against a strategy that exposes no aggregation to search against;
- a rule that needs more rows than one aggregation gets (e.g. 2f >= n for the trimmed mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedsim.contract import SERVERS, RunFacts, Server, Strategy
from fedsim.errors import ConfigError
from fedsim.faults.byzantine import Byzantine
from fedsim.uplink import Uplink


@dataclass(frozen=True)
class Plan:
    """The chosen plug-ins of a run, before anything starts."""

    strategy: Strategy
    server: Server
    byzantine: Byzantine
    uplink: Uplink
    facts: RunFacts
    nodes_per_round: int
    names: dict[str, str] = field(default_factory=dict)
    """Config group -> chosen option, as the user typed it (for the messages)."""
    fixed_count: bool = True
    """Whether the participation model takes exactly ``nodes_per_round`` nodes per round (False:
    an availability model, under which the number of senders varies from round to round)."""

    def option(self, group: str, fallback: object) -> str:
        return f"{group}={self.names.get(group, type(fallback).__name__)}"


def check(plan: Plan) -> None:
    """Raise ConfigError for the first combination in ``plan`` that cannot work."""
    strategy, server, caps = plan.strategy, plan.server, plan.strategy.capabilities
    s = plan.option("strategy", strategy)
    if server.kind not in caps.servers:
        allowed = sorted(caps.servers)
        if allowed == ["p2p"]:
            raise ConfigError(f"{s} runs peer to peer; add server=p2p")
        if server.kind == "p2p":
            raise ConfigError(
                f"server=p2p runs peer-to-peer strategies (strategy=monna); {s} aggregates at a "
                f"server: use {' or '.join(f'server={k}' for k in SERVERS if k in caps.servers)}"
            )
        if allowed == ["async"]:
            raise ConfigError(f"{s} aggregates stale updates; add server=async")
        raise ConfigError(f"{s} runs on {' or '.join(f'server={k}' for k in allowed)}, not server={server.kind}")
    facts = plan.facts
    if caps.needs_all_nodes and not _every_node_every_round(plan):
        raise ConfigError(
            f"{s} needs every node in every round; set nodes_per_round={facts.num_nodes} "
            f"(= num_nodes) and participation=uniform or participation=full"
        )
    if plan.uplink.active and server.kind == "p2p":
        raise ConfigError(
            "server=p2p exchanges whole models between peers and has no uplink to compress; "
            "remove the compressor=/feedback= options (compressed gossip is not implemented)"
        )
    if caps.broadcast != "none" and server.kind not in ("sync", "async"):
        servers = " or ".join(f"server={k}" for k in sorted(caps.servers & {"sync", "async"})) or "a server"
        raise ConfigError(
            f"{s} sends a broadcast beside the model, which server={server.kind} cannot carry "
            f"(members exchange models only); use {servers}"
        )
    names = [v.name for v in caps.message]
    if caps.rows != "update" and caps.message[0].size is not None:
        raise ConfigError(
            f"{s} declares rows={caps.rows}, which applies to its first vector {names[0]!r}; that vector "
            "must be model-sized (size None)"
        )
    attack = plan.byzantine.attack
    targets = getattr(attack, "vectors", None)
    if targets is not None:
        unknown = [t for t in targets if t not in names]
        if unknown:
            raise ConfigError(
                f"{plan.option('attack', attack)} targets the vectors {unknown}, but {s} sends "
                f"{', '.join(names)}; set attack.vectors to some of them (or null: all)"
            )
    if attack is not None and attack.needs_defence and not caps.defence:
        raise ConfigError(
            f"{plan.option('attack', attack)} line-searches its strength against the aggregation, "
            f"which {s} does not expose; use a fixed-strength attack (attack=alie, attack=ipm)"
        )
    strategy.check(server.rows_per_step(strategy, facts, plan.nodes_per_round))
    possible = _most_senders(plan)
    if possible is not None:
        try:
            strategy.check(possible)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} (under {plan.option('participation', 'participation')} at most {possible} nodes can take "
                "part in a step, so every step would be skipped)"
            ) from None


def warnings(plan: Plan) -> list[str]:
    """What is allowed but likely wasted, said once at the start of the run: under an
    availability model, fewer nodes take part in a step on average than the rule needs, so most
    steps will be skipped."""
    if plan.server.kind != "sync" or plan.fixed_count or _most_senders(plan) is None:
        return []
    expected = float(np.sum(plan.facts.participation_probs))
    try:
        plan.strategy.check(max(1, int(expected)))
    except ConfigError as exc:
        return [
            f"about {expected:.1f} nodes take part in a step on average under "
            f"{plan.option('participation', 'participation')}, and {exc}: most steps will be skipped (the model "
            "stays); raise participation.p or num_nodes"
        ]
    return []


def _most_senders(plan: Plan) -> int | None:
    """The most rows a synchronous step can ever get under an availability model (every node that
    may take part at all); None where the count is fixed or another server decides it."""
    if plan.server.kind != "sync" or plan.fixed_count:
        return None
    return int(np.count_nonzero(plan.facts.participation_probs > 0))


def _every_node_every_round(plan: Plan) -> bool:
    facts = plan.facts
    return plan.nodes_per_round == facts.num_nodes and bool(np.all(facts.participation_probs == 1.0))
