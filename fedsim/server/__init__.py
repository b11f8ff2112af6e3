"""Server loops: synchronous rounds (`sync`); the asynchronous virtual-clock loop comes later."""

from fedsim.server.state import ServerState

__all__ = ["ServerState"]
