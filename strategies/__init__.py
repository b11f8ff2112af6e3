"""Algorithms: aggregation rules, server optimizers, client update rules and the strategies that
pair them. Each is registered by the ``_target_`` of its YAML in conf/; there is no registry."""

from strategies.protocols import Aggregator, ClientUpdate, ServerOptimizer, Strategy

__all__ = ["Aggregator", "ClientUpdate", "ServerOptimizer", "Strategy"]
