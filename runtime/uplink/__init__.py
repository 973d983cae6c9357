"""Uplink: staging of chunks, verification and self-test, the atomic switch, rollback."""
