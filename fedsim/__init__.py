"""fedsim: a distributed simulator for federated and robust learning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fedsim.results import Run


def load_run(path: Any) -> Run:
    """A finished (or stopped) run folder: its config, per-step metrics and final model
    (`fedsim.results.load_run`)."""
    from fedsim.results import load_run as load

    return load(path)


__all__ = ["load_run", "__version__"]
