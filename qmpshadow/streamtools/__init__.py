"""Asyncio shells around the migration-stream codec: inspect (record and diff later)."""
