"""Adapters for the libraries applications already use, each in its own module.

Import the one you need (``replica_router.integrations.psycopg2``); each needs
its library installed (the extra of the same name: ``pip install
replica-router[psycopg2]``) and nothing else loads it.
"""

from __future__ import annotations

__all__: list[str] = []
