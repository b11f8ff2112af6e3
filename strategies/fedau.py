"""FedAU and the baselines for unknown participation (docs/methods/fedau.md; S. Wang and M. Ji,
*A Lightweight Method for Tackling Unknown Participation Statistics in Federated Averaging*,
ICLR 2024, arXiv 2306.03401; the rules below follow the authors' code, github.com/IBM/fedau,
``main.py``).

Objective: the *uniform* average (1/N) sum_n F_n. Participants run the client update (local SGD,
no momentum) and send m_n = start - local = -Delta_n; the server applies
x <- x - lr_g * direction (``server_opt``, SGD with lr = eta_g) with, by ``weighting``:

- ``adaptive`` (FedAU): direction = (1/N) sum_{n in S_t} w_n m_n, w_n the online estimate of
  1/p_n below, computed from the intervals recorded *before* round t; 1 until a node has a
  recorded interval (the code's cold start). The divisor is N, not |S_t|.
- ``average_participating``: (1/|S_t|) sum_{S_t} m_n (plain FedAvg; 0 when S_t is empty).
- ``average_all``: (1/N) sum_{S_t} m_n.
- ``known_prob`` (oracle): (1/N) sum_{S_t} m_n / p_n, with the participation model's true rates.
- ``fedvarp`` (Jhunjhunwala et al. 2022): the server stores every node's last message y_n;
  direction = (1/|S_t|) sum_{S_t} (m_n - y_n) + mean_n y_n (the mean from *before* this
  round's refresh, as in the code), then y_n <- m_n for n in S_t; no step when S_t is empty.
- ``mifa`` (Gu et al. 2021): y_n <- m_n for n in S_t, direction = mean over all N of y_n
  (never-seen nodes count 0).

FedVarp and MIFA hold each node's last update on the server (``state["stored"]``, float32, only
for nodes that have sent: at most 4 N d bytes, e.g. 250 nodes x 50,890 parameters = 51 MB,
10,000 nodes x 100,000 = 4 GB) and their running sum (float64, ``state["stored_sum"]``), so a
round touches only its participants' rows. FedAU holds three numbers per node.

The estimator (FedAU, Algorithm 1 of the paper; kept for every weighting so that its weights can
be logged and compared): per node a counter c_n of rounds since the last participation, and the
running mean w_n of M_n recorded intervals. A participant records the interval c_n + 1 and resets
c_n; an absent node increments c_n, and when c_n reaches the cutoff K records K and resets.
``cutoff=None`` is K = infinity.

Metrics: ``fedau/weight_mean`` (mean weight applied to this round's participants),
``fedau/estimate_mean``/``_min``/``_max`` over nodes with a recorded interval, and, every
``log_weights_every`` rounds, ``fedau/estimates`` (the list of all N current estimates, NaN
where none is recorded yet). When the run's participation model exposes its true rates, also
``fedau/estimate_rel_err``: the median over nodes of |w_n p_n - 1|, and beside the estimates the
list ``fedau/rates`` of the true p_n (the rates are *not* used by the weighting, only by these
diagnostics and by ``known_prob``; ``scripts/fedau_weights.py`` plots w_n against 1/p_n).

"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedsim.contract import Capabilities, ClientUpdate, RunFacts, ServerOptimizer, Strategy
from fedsim.errors import ConfigError
from fedsim.state import PersistentMap
from fedsim.types import RoundInfo, UpdateBatch
from strategies.server_opt import ServerSGD

WEIGHTINGS = ("adaptive", "average_participating", "average_all", "known_prob", "fedvarp", "mifa")


def estimator_update(
    c: np.ndarray, M: np.ndarray, w: np.ndarray, participated: np.ndarray, cutoff: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One round of FedAU's interval estimator for all N nodes (pure: returns new arrays).

    Returns (weights used this round by each node, c, M, w): the weight is the mean of the
    intervals recorded before this round (1 for a node with none)."""
    c, M, w = c.copy(), M.copy(), w.copy()
    used = np.where(M > 0, w, 1.0)
    length = np.zeros(len(c), dtype=np.float64)
    # participants: record c + 1, reset
    record = participated.copy()
    length[participated] = c[participated] + 1
    c[participated] = 0
    # absent nodes: count; at the cutoff record K and reset
    absent = ~participated
    c[absent] += 1
    if cutoff is not None:
        hit = absent & (c >= cutoff)
        record |= hit
        length[hit] = c[hit]
        c[hit] = 0
    w[record] = (M[record] * w[record] + length[record]) / (M[record] + 1)
    M[record] += 1
    return used, c, M, w


class FedAU(Strategy):
    """FedAvg with one of the participation weightings above (``weighting``, default FedAU's
    ``adaptive``), a client update and an SGD server optimiser with lr eta_g. The baselines'
    options (`AvgParticipating`, `AvgAll`, `KnownProb`, `FedVarp`, `MIFA`) are this class with
    their weighting fixed. It sees rounds without participants (it counts absences)."""

    capabilities = Capabilities(accepts_empty=True, defence=False)

    def __init__(
        self,
        *,
        client: ClientUpdate,
        weighting: str = "adaptive",
        cutoff: int | None = None,
        server_opt: ServerOptimizer | None = None,
        log_weights_every: int = 50,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"strategy.weighting={weighting!r} must be one of {', '.join(WEIGHTINGS)}")
        if cutoff is not None and int(cutoff) < 1:
            raise ConfigError(f"strategy.cutoff={cutoff} must be >= 1, or null for no cutoff")
        self.client = client
        self.weighting = weighting
        self.cutoff = None if cutoff is None else int(cutoff)
        self.server_opt: ServerOptimizer = server_opt if server_opt is not None else ServerSGD()
        self.log_weights_every = int(log_weights_every)

    def init(self, params: torch.Tensor, facts: RunFacts) -> dict[str, Any]:
        n = len(facts.sizes)
        participation_probs = facts.participation_probs
        state: dict[str, Any] = {
            "server_opt": self.server_opt.init(params),
            "count": np.zeros(n, dtype=np.int64),
            "intervals": np.zeros(n, dtype=np.int64),
            "estimate": np.zeros(n, dtype=np.float64),
            "probs": None if participation_probs is None else np.asarray(participation_probs, dtype=np.float64),
        }
        if self.weighting in ("fedvarp", "mifa"):
            # each node's last update (nodes never seen count as zero rows), and their sum
            state["stored"] = PersistentMap()
            state["stored_sum"] = params.new_zeros(params.numel(), dtype=torch.float64)
        return state

    def direction(
        self, U: torch.Tensor, ids: torch.Tensor, used: np.ndarray, state: dict[str, Any], N: int
    ) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """The aggregated message (None: no step this round) and the new stored updates."""
        k = U.shape[0]
        if self.weighting in ("fedvarp", "mifa"):
            # O(k d) per round: only the participants' rows change, and the sum follows them
            # (a map moved between devices may come back as a plain dict: PersistentMap.of re-wraps it)
            stored, total = PersistentMap.of(state["stored"]), state["stored_sum"]
            zero = U.new_zeros(U.shape[1])
            nodes = ids.tolist()  # one read of the ids, wherever they live
            old = torch.stack([stored.get(i, zero) for i in nodes]) if k else U
            before = (total / N).to(U.dtype)
            if k:
                total = total + (U - old).to(torch.float64).sum(0)
                stored = stored.updated({i: U[r].clone() for r, i in enumerate(nodes)})
            new = {"stored": stored, "stored_sum": total}
            if self.weighting == "fedvarp":
                return (None if k == 0 else (U - old).mean(0) + before), new
            return (total / N).to(U.dtype), new

        if k == 0:
            return (None if self.weighting == "average_participating" else U.new_zeros(U.shape[1])), {}
        if self.weighting == "average_participating":
            return U.mean(0), {}
        if self.weighting == "average_all":
            return U.sum(0) / N, {}
        if self.weighting == "known_prob":
            p = torch.from_numpy(state["probs"][ids.cpu().numpy()]).to(device=U.device, dtype=U.dtype)
            return (U / p[:, None]).sum(0) / N, {}
        w = torch.from_numpy(used[ids.cpu().numpy()]).to(device=U.device, dtype=U.dtype)
        return (w @ U) / N, {}

    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
        N = len(state["count"])
        ids = batch.node_ids
        if len(set(ids.tolist())) != len(ids):
            raise ValueError("FedAU needs at most one message per node and round")
        participated = np.zeros(N, dtype=bool)
        participated[ids.cpu().numpy()] = True
        used, c, M, w = estimator_update(
            state["count"], state["intervals"], state["estimate"], participated, self.cutoff
        )
        U = batch.messages if len(batch) else params.new_zeros((0, params.numel()))
        direction, extra = self.direction(U, ids, used, state, N)
        opt_state = state["server_opt"]
        new_params = params
        if direction is not None:
            new_params, opt_state = self.server_opt.step(params, direction, opt_state)
        new_state = {**state, **extra, "server_opt": opt_state, "count": c, "intervals": M, "estimate": w}
        return new_params, new_state, self.metrics(info, used[participated], M, w, state["probs"], direction)

    def metrics(
        self,
        info: RoundInfo,
        used: np.ndarray,
        M: np.ndarray,
        w: np.ndarray,
        probs: np.ndarray | None,
        direction: torch.Tensor | None,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"agg/direction_norm": 0.0 if direction is None else float(direction.norm())}
        if len(used):
            out["fedau/weight_mean"] = float(used.mean())
        seen = M > 0
        if seen.any():
            out.update(
                {
                    "fedau/estimate_mean": float(w[seen].mean()),
                    "fedau/estimate_min": float(w[seen].min()),
                    "fedau/estimate_max": float(w[seen].max()),
                }
            )
            if probs is not None:
                out["fedau/estimate_rel_err"] = float(np.median(np.abs(w[seen] * probs[seen] - 1.0)))
        if self.log_weights_every > 0 and (info.round + 1) % self.log_weights_every == 0:
            out["fedau/estimates"] = [float(x) if m > 0 else float("nan") for x, m in zip(w, M)]
            if probs is not None:
                out["fedau/rates"] = [float(p) for p in probs]
        return out


class _Baseline(FedAU):
    """A baseline: FedAU's machinery with one weighting fixed."""

    option = ""
    weighting_name = ""

    def __init__(self, *, weighting: str | None = None, **kwargs: Any) -> None:
        if weighting is not None and weighting != self.weighting_name:
            raise ConfigError(
                f"strategy.weighting={weighting!r} does not fit strategy={self.option} (its weighting is "
                f"'{self.weighting_name}'); choose any weighting with strategy=fedau strategy.weighting=..."
            )
        super().__init__(weighting=self.weighting_name, **kwargs)


class AvgParticipating(_Baseline):
    """``strategy=avg_participating``: the mean over this round's participants (plain FedAvg)."""

    option, weighting_name = "avg_participating", "average_participating"


class AvgAll(_Baseline):
    """``strategy=avg_all``: the participants' sum divided by all N nodes."""

    option, weighting_name = "avg_all", "average_all"


class KnownProb(_Baseline):
    """``strategy=known_prob``: the oracle, each participant divided by its true rate p_n, over N."""

    option, weighting_name = "known_prob", "known_prob"


class FedVarp(_Baseline):
    """``strategy=fedvarp`` (Jhunjhunwala et al. 2022): variance reduction with every node's last
    update stored on the server (N d memory)."""

    option, weighting_name = "fedvarp", "fedvarp"


class MIFA(_Baseline):
    """``strategy=mifa`` (Gu et al. 2021): the mean of every node's last update (N d memory)."""

    option, weighting_name = "mifa", "mifa"
