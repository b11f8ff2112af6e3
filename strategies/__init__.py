"""Algorithms: aggregation rules, server optimizers, client update rules, error-feedback rules and
the strategies that pair them. Each is registered by the ``_target_`` of its YAML in conf/; there
is no registry. The contract they implement is ``fedsim.contract``."""
