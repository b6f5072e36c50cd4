"""Thin asyncio adapters that move bytes between sockets and the sans-IO proxy core."""
