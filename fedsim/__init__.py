"""fedsim: a distributed simulator for federated and robust learning."""

__version__ = "0.1.0"
