"""Datasets, partitioners and the federated view that the executors ship to workers."""

from fedsim.data.base import Dataset, FederatedData, Partition

__all__ = ["Dataset", "FederatedData", "Partition"]
