"""Throwaway PostgreSQL and Redis servers started from the installed binaries.

Used by ``roost dev-cluster`` to try cluster mode on one machine, and by the
test suite; never for production (see docs/deploy.md).
"""
