"""The SQLAlchemy integration where SQLAlchemy users already are: Flask-SQLAlchemy 3
(its documented ``session_options={"class_": ...}``) and Alembic migrations."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

from alembic import command
from alembic.config import Config
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.session import Session as FlaskSession
from sqlalchemy import text
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.pool import NullPool

from helpers import FAST, replay_paused
from replica_router import Cluster
from replica_router.integrations.sqlalchemy import RoutingSession, sessionmaker
from replica_router.sandbox import LocalCluster

PORT = text("SELECT inet_server_port()")


class AppSession(RoutingSession, FlaskSession):
    """Flask-SQLAlchemy's session (bind keys, signals) routed by replica-router."""


def test_flask_sqlalchemy_reads_its_writes(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster:
        app = Flask(__name__)
        # Flask-SQLAlchemy wants a URI; its own engine only serves db.engine users.
        app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg://"
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"poolclass": NullPool}
        db = SQLAlchemy(app, session_options={"class_": AppSession, "cluster": cluster})
        table = f"flask_posts_{uuid.uuid4().hex[:8]}"

        class Post(db.Model):  # type: ignore[name-defined,misc]
            __tablename__ = table
            id: Mapped[int] = mapped_column(primary_key=True)
            title: Mapped[str]

        with app.app_context():
            db.metadata.create_all(db.session.connection())  # the primary
            db.session.commit()
        try:
            with replay_paused(lc):
                with app.app_context():
                    assert isinstance(db.session(), AppSession)
                    post = Post(title="hello")
                    db.session.add(post)
                    db.session.commit()
                    post_id = post.id  # the reload reads a node that has the commit
                with app.app_context():  # the next request of the same user
                    assert db.session.get(Post, post_id).title == "hello"
                    assert db.session.scalar(PORT) == lc.port("primary")
            with app.app_context(), cluster.session(inherit=False):
                assert db.session.scalar(PORT) != lc.port("primary")  # reads: a replica
        finally:
            lc.execute("primary", f"DROP TABLE IF EXISTS {table}")


def test_alembic_migrates_the_primary(replica_cluster: LocalCluster, tmp_path: Path) -> None:
    lc = replica_cluster
    table = f"migrated_{uuid.uuid4().hex[:8]}"
    (tmp_path / "versions").mkdir()
    (tmp_path / "env.py").write_text(
        textwrap.dedent(
            """
            from alembic import context

            context.configure(connection=context.config.attributes["connection"])
            with context.begin_transaction():
                context.run_migrations()
            """
        )
    )
    (tmp_path / "versions" / "0001_create.py").write_text(
        textwrap.dedent(
            f"""
            import sqlalchemy as sa
            from alembic import op

            revision = "0001"
            down_revision = None

            def upgrade():
                op.create_table("{table}", sa.Column("id", sa.Integer, primary_key=True))

            def downgrade():
                op.drop_table("{table}")
            """
        )
    )
    config = Config()
    config.set_main_option("script_location", str(tmp_path))
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster:
        Session = sessionmaker(cluster)
        try:
            with replay_paused(lc), Session() as session:
                connection = session.connection()  # no arguments: the primary
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                session.commit()
                with Session() as reader:  # the scope's token: a node that has the table
                    assert reader.scalar(text(f"SELECT count(*) FROM {table}")) == 0
            assert lc.execute("primary", "SELECT version_num FROM alembic_version") == [("0001",)]
        finally:
            lc.execute("primary", f"DROP TABLE IF EXISTS {table}")
            lc.execute("primary", "DROP TABLE IF EXISTS alembic_version")
