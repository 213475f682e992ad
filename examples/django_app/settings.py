"""Settings of the example: the primary and replicas come from the environment.

``DATABASE_URL`` is the primary, ``DATABASE_REPLICA_URLS`` the replicas
(comma-separated), as for ``Cluster.from_env``. Each becomes a DATABASES alias:
``default``, ``replica1``, ``replica2``...
"""

from __future__ import annotations

import os
from typing import Any

from psycopg.conninfo import conninfo_to_dict


def database(url: str, *, replica: bool = False) -> dict[str, Any]:
    params = conninfo_to_dict(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params.get("dbname", ""),
        "USER": params.get("user", ""),
        "PASSWORD": params.get("password", ""),
        "HOST": params.get("host", ""),
        "PORT": params.get("port", ""),
        "CONN_MAX_AGE": 60,
        # Under `manage.py test` a replica reads the primary's test database.
        "TEST": {"MIRROR": "default"} if replica else {},
    }


_replicas = [u.strip() for u in os.environ.get("DATABASE_REPLICA_URLS", "").split(",") if u.strip()]
DATABASES = {"default": database(os.environ["DATABASE_URL"])}
DATABASES.update({f"replica{i}": database(url, replica=True) for i, url in enumerate(_replicas, 1)})

DATABASE_ROUTERS = ["replica_router.integrations.django.ReplicaRouter"]
REPLICA_ROUTER = {
    "PRIMARY": "default",
    "REPLICAS": [alias for alias in DATABASES if alias != "default"],
    "OPTIONS": {"max_lag": 2.0},
}
MIDDLEWARE = [
    "replica_router.integrations.django.ConsistencyMiddleware",  # first: it sees every write
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
]
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.sessions", "blog"]
ROOT_URLCONF = "urls"
SECRET_KEY = os.environ.get("SECRET_KEY", "change-me: the example's key")
DEBUG = os.environ.get("DEBUG") == "1"
ALLOWED_HOSTS = ["*"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
