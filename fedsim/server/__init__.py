"""Server loops: synchronous rounds (`sync`), the asynchronous virtual clock (`async_server`),
peer to peer (`p2p`); all hand their steps to the shared round pipeline (`pipeline`)."""
