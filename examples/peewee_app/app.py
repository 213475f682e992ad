"""Seed 003's Peewee app with replica-router: a Flask API whose models read from replicas.

One ``RoutedPostgresqlDatabase`` is every model's ``Meta.database``: selects go to a
replica, writes and transactions to the primary, and a user's next request (on any
worker process) reads their own writes because the WAL position of each write travels
in a cookie (``ConsistencyMiddleware``). Peewee's usual per-request ``connect()`` /
``close()`` hooks hand both node links back to the cluster's pools.

    app = create_app(Cluster.from_env())        # DATABASE_URL + DATABASE_REPLICA_URLS
"""

from __future__ import annotations

from typing import Any

import peewee
from flask import Flask, abort, jsonify, request

from replica_router import Cluster
from replica_router.integrations.peewee import RoutedPostgresqlDatabase, check_connections
from replica_router.wsgi import ConsistencyMiddleware

SCHEMA = "CREATE TABLE IF NOT EXISTS example_user (id serial PRIMARY KEY, name text, email text)"

db = peewee.DatabaseProxy()  # bound once at start-up, never per query


class User(peewee.Model):
    name = peewee.TextField()
    email = peewee.TextField()

    class Meta:
        database = db
        table_name = "example_user"

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "email": self.email}


def create_app(cluster: Cluster) -> Flask:
    """The API over an open ``cluster``."""
    database = RoutedPostgresqlDatabase(cluster)
    db.initialize(database)
    app = Flask(__name__)

    @app.before_request
    def _connect() -> None:
        database.connect(reuse_if_open=True)

    @app.teardown_request
    def _close(exc: BaseException | None) -> None:
        database.close()  # both links back to their pools

    @app.post("/users")
    def create_user() -> Any:
        body = request.get_json(force=True)
        user = User.create(name=body["name"], email=body["email"])  # the primary
        return jsonify(user.as_dict()), 201

    @app.get("/users/<int:user_id>")
    def get_user(user_id: int) -> Any:
        user = User.get_or_none(User.id == user_id)  # a replica that has your last write
        if user is None:
            abort(404)
        return jsonify(user.as_dict())

    @app.post("/users/<int:user_id>/rename")
    def rename(user_id: int) -> Any:
        with database.atomic():  # the primary throughout, the select included
            user = User.select().where(User.id == user_id).for_update().get_or_none()
            if user is None:
                abort(404)
            user.name = request.get_json(force=True)["name"]
            user.save()
        return jsonify(user.as_dict())

    @app.get("/health")
    def health() -> Any:
        return jsonify(check_connections(database))  # seed 003: {node: healthy}

    @app.get("/status")
    def status() -> Any:
        return jsonify([node.as_dict() for node in database.status()])

    app.wsgi_app = ConsistencyMiddleware(app.wsgi_app, cluster=cluster)
    return app
