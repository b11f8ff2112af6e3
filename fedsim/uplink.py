"""The compressed uplink, an engine stage (config groups ``compressor`` and ``feedback``).

Node side (`Uplink.encode`, run by the worker right after the client update): the client's
message g becomes what is sent, by the feedback rule (``strategies/feedback.py``) with the
compressor (``fedsim/compress.py``); the rule's per-node state (e, h, v) lives in the node's
state under ``"uplink"``; random compressors draw from (seed, "compress", round, node). Messages
a client flags as reports (``ClientResult.report``: VRLS's label counts, calibration sums and
marginals) pass uncompressed and untouched.

Server side, for the rules whose messages are increments of a per-node estimate h_i (EF21,
EF21-SGDM, EControl; `Feedback.estimate`), one of two modes, chosen from the strategy's declared
contract:

- **mirror** (the strategy is ``linear``: its step depends on the rows only through their
  weighted mean): the server keeps h = sum_i w_i h_i in d floats, adds sum_{received i} w_i Delta_i
  every step (w_i = 1/N, or n_i / sum n for example-weighted strategies) and hands the strategy
  h as the one row of the step. Nodes that are not sampled keep contributing their last h_i
  (EF21 under partial participation).
- **per node** (any other strategy: robust aggregators, FedAU's weights, stale-update steps):
  the server keeps every sender's h_i (d floats per node that has sent; N d in the end) and
  hands the strategy the senders' current h_i as their rows, so the strategy combines the
  nodes' estimates as it would combine their messages.

A message of several vectors (`fedsim.contract.Capabilities.message`) goes through one stage per
vector: each vector that declares ``compress`` is compressed with its own stream (seed, "compress",
round, node, name) and its own feedback state (``"uplink"`` then maps vector names to states); the
others are sent dense and as they are. Server side, only the compressed vectors' columns are
increments of an estimate; mirror mode needs every vector compressed, else per-node mode applies.

Naive compression and EF14 send C(.) of a vector in message units: the rows are the messages.
The attack sees the rows as the strategy will combine them (``fedsim.server.pipeline``): the
increments in mirror mode, the estimates h_i in per-node mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedsim.compress import Compressor
from fedsim.contract import Feedback, RunFacts, Strategy, is_linear, message_layout
from fedsim.seeding import torch_rng
from fedsim.state import PersistentMap
from fedsim.types import ClientContext, Layout, NodeState, UpdateBatch

MODES = ("none", "mirror", "per_node")


class Uplink:
    """A compressor with a feedback rule; ``active`` is False for the identity compressor without
    feedback (messages go as they are)."""

    def __init__(self, compressor: Compressor, feedback: Feedback) -> None:
        self.compressor = compressor
        self.feedback = feedback
        self.active = not (compressor.is_identity and feedback.name == "none")

    # -- node side ---------------------------------------------------------------------------

    def encode(
        self,
        g: torch.Tensor,
        state: NodeState | None,
        ctx: ClientContext,
        sizes: Sequence[int],
        layout: Layout | None = None,
    ) -> tuple[torch.Tensor, int, NodeState, dict[str, float]]:
        """(message sent, its bytes, the node's new uplink state, metrics) for the client's row
        g: one stage for a one-vector message, one per vector of a ``layout`` of several."""
        if layout is None or layout.single:
            compress = self.stage(torch_rng(ctx.seed, "compress", ctx.round, ctx.node_id), sizes, None)
            message, nbytes, new = self.feedback.node(g, state or {}, compress)
            metrics = {"compress/error_norm": float(new["e"].norm())} if "e" in new else {}
            return message, nbytes, new, metrics
        parts, total, states, errors = [], 0, {}, []
        for vector, cols in layout.items():
            seg = g[cols]
            if not vector.compress:
                parts.append(seg)
                total += seg.numel() * seg.element_size()
                continue
            compress = self.stage(
                torch_rng(ctx.seed, "compress", ctx.round, ctx.node_id, vector.name), sizes, vector.size
            )
            sent, nbytes, new = self.feedback.node(seg.clone(), (state or {}).get(vector.name, {}), compress)
            parts.append(sent)
            total += int(nbytes)
            states[vector.name] = new
            if "e" in new:
                errors.append(new["e"])
        metrics = {"compress/error_norm": float(torch.cat(errors).norm())} if errors else {}
        return torch.cat(parts), total, states, metrics

    def stage(self, rng: torch.Generator, sizes: Sequence[int], size: int | None) -> Any:
        """The compressor of one vector's stage: ``v -> Payload`` with its own stream; a
        model-sized vector (``size`` None) is cut by the model's layer ``sizes``."""
        cut = list(sizes) if size is None else [int(size)]

        def compress(v: torch.Tensor) -> Any:
            return self.compressor.compress(v, rng, cut)

        return compress

    # -- server side -------------------------------------------------------------------------

    def mode(self, strategy: Strategy) -> str:
        if not self.active or not self.feedback.estimate:
            return "none"
        every = all(v.compress for v in strategy.capabilities.message)
        return "mirror" if is_linear(strategy) and every else "per_node"

    def init(self, params: torch.Tensor, strategy: Strategy, facts: RunFacts) -> dict[str, Any]:
        mode = self.mode(strategy)
        if mode == "mirror":
            w = np.asarray(facts.sizes, dtype=np.float64)
            if not strategy.capabilities.weighted or w.sum() <= 0:
                w = np.ones_like(w)
            width = message_layout(strategy, params.numel()).width
            h = torch.zeros_like(params) if width == params.numel() else params.new_zeros(width)
            return {"h": h, "node_weights": torch.from_numpy(w / w.sum()).to(params.device)}
        if mode == "per_node":
            return {"h": PersistentMap()}
        return {}

    def decode(self, batch: UpdateBatch, state: dict[str, Any]) -> tuple[UpdateBatch, dict[str, Any]]:
        """Per-node mode: each sender's increment is added to the server's copy of its h_i, and
        its row becomes h_i. Other modes and reports: unchanged."""
        if batch.report or "h" not in state or not isinstance(state["h"], Mapping) or len(batch) == 0:
            return batch, state
        h = PersistentMap.of(state["h"])
        # the columns that are increments of an estimate (every column of a one-vector message)
        lay = batch.layout
        keep = None
        if lay is not None and not lay.single:
            keep = torch.zeros(lay.width, dtype=torch.bool, device=batch.messages.device)
            for vector, cols in lay.items():
                keep[cols] = vector.compress
        changes: dict[int, torch.Tensor] = {}
        rows = []
        for nid, delta in zip(batch.node_ids.tolist(), batch.messages):
            old = changes.get(nid, h.get(nid))
            if old is None:
                changes[nid] = delta.clone()
            elif keep is None:
                changes[nid] = old + delta
            else:  # dense vectors are sent whole: their columns are replaced, not accumulated
                changes[nid] = torch.where(keep, old + delta, delta)
            rows.append(changes[nid])
        h = h.updated(changes)
        return replace(batch, messages=torch.stack(rows)), {**state, "h": h}

    def fold(self, batch: UpdateBatch, state: dict[str, Any]) -> tuple[UpdateBatch, dict[str, Any]]:
        """Mirror mode: fold the step's increments into h = sum_i w_i h_i and hand the strategy h
        as the step's single row. Other modes and reports: unchanged."""
        if batch.report or len(batch) == 0 or not isinstance(state.get("h"), torch.Tensor):
            return batch, state
        weights = state["node_weights"]
        w = weights.index_select(0, batch.node_ids.to(weights.device))
        w = w.to(device=batch.messages.device, dtype=batch.messages.dtype)
        h = state["h"] + w @ batch.messages
        one = torch.ones(1, dtype=torch.int64, device=batch.num_examples.device)
        out = UpdateBatch(
            batch.node_ids[:1], h.unsqueeze(0), one, batch.base_version[:1], batch.bytes_up[:1], layout=batch.layout
        )
        return out, {**state, "h": h}
