"""Errors name their cause, and configuration mistakes fail at construction.

When no node can be used, ``PrimaryUnavailable`` / ``NoReplicaAvailable`` carry each
node's last error (redacted), and ``open(wait=True, timeout=...)`` fails with them
instead of starting a cluster that cannot write. A server listed twice, or the
primary listed as a replica, is rejected before anything connects.
"""

from __future__ import annotations

import pytest

from helpers import run
from replica_router import (
    AsyncCluster,
    Cluster,
    ConfigurationError,
    NoReplicaAvailable,
    PrimaryUnavailable,
)
from replica_router.sandbox import LocalCluster

PASSWORD = "Rt-7qW3nB-causes"
WRONG = "Wr0ng-7qW3nB"
NOWHERE = "postgresql://app:{pw}@{host}.invalid/app"


@pytest.fixture(scope="module")
def locked() -> LocalCluster:
    """A sandbox whose ``postgres`` user needs a password."""
    with LocalCluster(replicas=1, password=PASSWORD) as lc:
        yield lc  # type: ignore[misc]


def wrong_password_cluster(lc: LocalCluster, cls: type = Cluster) -> object:
    return cls(
        primary=lc.dsn("primary").replace(PASSWORD, WRONG),
        replicas=[lc.dsn("replica1").replace(PASSWORD, WRONG)],
        connect_timeout=1,
    )


def unresolvable(cls: type = Cluster) -> object:
    return cls(
        primary=NOWHERE.format(pw=PASSWORD, host="nosuchhost"),
        replicas=[NOWHERE.format(pw=PASSWORD, host="nosuchreplica")],
        connect_timeout=1,
    )


# -- the causes in the exception text -----------------------------------------------


def test_a_write_and_a_read_name_a_wrong_password(locked: LocalCluster) -> None:
    with wrong_password_cluster(locked) as cluster:  # type: ignore[attr-defined]
        with pytest.raises(PrimaryUnavailable) as write, cluster.write():
            pass
        with pytest.raises(NoReplicaAvailable) as read, cluster.read():
            pass
    for raised in (write, read):
        text = str(raised.value)
        assert "password authentication failed" in text
        assert "primary:" in text and "replica1:" in text  # each node's cause, by name
        assert WRONG not in text and PASSWORD not in text


def test_a_write_names_an_unresolvable_host() -> None:
    cluster = unresolvable()
    with cluster, pytest.raises(PrimaryUnavailable) as raised, cluster.write():  # type: ignore[attr-defined]
        pass
    text = str(raised.value)
    assert "nosuchhost.invalid" in text and "nosuchreplica.invalid" in text
    assert "failed to resolve host" in text  # psycopg resolves names itself
    assert PASSWORD not in text


# -- open(wait=True) ---------------------------------------------------------------


def test_open_without_wait_starts_even_though_no_node_is_reachable() -> None:
    cluster = unresolvable()
    with cluster:  # type: ignore[attr-defined]
        assert cluster.topology.primary is None  # type: ignore[attr-defined]


def test_open_wait_raises_with_each_nodes_cause(locked: LocalCluster) -> None:
    cluster = wrong_password_cluster(locked)
    with pytest.raises(PrimaryUnavailable) as raised:
        cluster.open(wait=True, timeout=2)  # type: ignore[attr-defined]
    text = str(raised.value)
    assert "password authentication failed" in text and "replica1:" in text
    assert WRONG not in text and PASSWORD not in text
    assert cluster.status()[0].last_error is None  # type: ignore[attr-defined]  # closed again


def test_open_wait_returns_once_the_primary_is_measured(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    with Cluster(primary=lc.primary_dsn, replicas=lc.replica_dsns).open(wait=True, timeout=5) as c:
        assert c.topology.primary == "primary"


def test_async_open_wait_raises_with_each_nodes_cause() -> None:
    async def main() -> str:
        cluster = unresolvable(AsyncCluster)
        with pytest.raises(PrimaryUnavailable) as raised:
            await cluster.open(wait=True, timeout=2)  # type: ignore[attr-defined]
        return str(raised.value)

    text = run(main())
    assert "nosuchhost.invalid" in text and "failed to resolve host" in text
    assert PASSWORD not in text


def test_async_open_wait_returns_once_the_primary_is_measured(
    replica_cluster: LocalCluster,
) -> None:
    lc = replica_cluster

    async def main() -> str | None:
        async with AsyncCluster(primary=lc.primary_dsn, replicas=lc.replica_dsns) as cluster:
            await cluster.close()
            await cluster.open(wait=True, timeout=5)
            return cluster.topology.primary

    assert run(main()) == "primary"


# -- configuration mistakes --------------------------------------------------------

SECRET = "Cfg-5sL0pM"
A = f"postgresql://app:{SECRET}@db1:5432/app"
B = f"postgresql://app:{SECRET}@db2:5432/app"


@pytest.mark.parametrize("cls", [Cluster, AsyncCluster])
def test_the_primary_listed_as_a_replica_is_rejected(cls: type) -> None:
    with pytest.raises(ConfigurationError) as raised:
        cls(primary=A, replicas=[B, A.replace("5432/", "/")])  # the default port, spelled out
    text = str(raised.value)
    assert "replicas[1] duplicates primary" in text and "db1:5432/app" in text
    assert SECRET not in text


def test_a_replica_listed_twice_is_rejected_in_any_dsn_form() -> None:
    kv = f"host=db2 port=5432 dbname=app user=app password={SECRET}"
    with pytest.raises(ConfigurationError) as raised:
        Cluster(primary=A, replicas=[B, kv])
    assert "replicas[1] duplicates replicas[0]" in str(raised.value)
    assert SECRET not in str(raised.value)
    with pytest.raises(ConfigurationError, match=r"nodes\['b'\] duplicates nodes\['a'\]"):
        Cluster(nodes={"a": A, "b": A})


def test_distinct_targets_are_accepted_as_written() -> None:
    # what is written is compared, not what it resolves to: another host name,
    # port or database is another node
    local = "postgresql://app@localhost:5432/app"
    Cluster(
        primary=local,
        replicas=[
            "postgresql://app@127.0.0.1:5432/app",
            "postgresql://app@localhost:5433/app",
            "postgresql://app@localhost:5432/other",
        ],
    )


def test_add_replica_of_a_dsn_already_in_the_cluster_is_rejected() -> None:
    cluster = Cluster(primary=A, replicas=[B])
    with pytest.raises(ConfigurationError) as raised:
        cluster.add_replica(B.replace(SECRET, "Zz-other-pw"), name="again")
    text = str(raised.value)
    assert "duplicates" in text and "'replica1'" in text and "db2:5432/app" in text
    assert SECRET not in text and "Zz-other-pw" not in text
    assert cluster.node_names == ["primary", "replica1"]  # nothing was added

    async def main() -> None:
        acluster = AsyncCluster(primary=A, replicas=[B])
        with pytest.raises(ConfigurationError, match="duplicates"):
            await acluster.add_replica(A)

    run(main())
