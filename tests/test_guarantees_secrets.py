"""Passwords never leave, even in DSNs libpq cannot parse (issue 11, defect 17).

libpq quotes the text it choked on in its error message; whatever it quotes may be
(part of) the password. No server needed: the DSNs are rejected before any connect.
"""

from __future__ import annotations

import pytest

from replica_router import Cluster, ConfigurationError
from replica_router.cli import main as cli_main
from replica_router.dsn import redact

SECRET = "Sekr1t"  # every password below contains it; so does each piece of a split one
TAIL = "Tail9w"

BAD_DSNS = {
    "raw percent in a URL password": f"postgresql://app:{SECRET}%zz{TAIL}@db:5432/app",
    "a leading space": f" postgresql://app:{SECRET}{TAIL}@db:5432/app",
    "an unquoted space in a key=value password": f"host=db user=app password={SECRET} {TAIL}",
    "a postgresql+psycopg URL": f"postgresql+psycopg://app:{SECRET}{TAIL}@db:5432/app",
    "a mysql URL": f"mysql://app:{SECRET}{TAIL}@db:3306/app",
    "a scheme-less user:pw@host/db": f"app:{SECRET}{TAIL}@db/app",
}


def leaked(text: str) -> list[str]:
    return [piece for piece in (SECRET, TAIL) if piece in text]


@pytest.mark.parametrize("dsn", BAD_DSNS.values(), ids=BAD_DSNS.keys())
def test_a_dsn_libpq_cannot_parse_is_rejected_without_its_password(dsn: str) -> None:
    """Defect 17: the error says which field is wrong and shows no part of the password,
    however the DSN is given (primary, replica, URL, runtime addition)."""
    attempts = [
        lambda: Cluster(dsn, []),
        lambda: Cluster("host=db", [dsn]),
        lambda: Cluster.from_url(dsn),
        lambda: Cluster("host=db", []).add_replica(dsn, name="extra"),
    ]
    for attempt in attempts:
        with pytest.raises(ConfigurationError) as caught:
            attempt()
        message = str(caught.value)
        assert not leaked(message), message
        assert not leaked(repr(caught.value)), repr(caught.value)


@pytest.mark.parametrize("dsn", BAD_DSNS.values(), ids=BAD_DSNS.keys())
def test_the_cli_rejects_a_dsn_libpq_cannot_parse_without_its_password(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 17: ``replica-router status DSN`` says the DSN is bad, without the password."""
    code = cli_main(["status", dsn])
    out = capsys.readouterr()
    assert code == 2
    assert "DSN 1" in out.err
    assert not leaked(out.out + out.err), out.out + out.err


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://app:pw@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("postgresql://app@h1:5432,h2:5432/app", "postgresql://app@h1:5432,h2:5432/app"),
        ("postgresql://db:5432/app", "postgresql://db:5432/app"),
        ("host=db password='a b\\' c' user=app", "host=db password=*** user=app"),
        ("host=db password=pw dbname=app", "host=db password=*** dbname=app"),
        ("user:pw@db/app", "user:***@db/app"),
    ],
)
def test_redaction_keeps_everything_but_the_password(dsn: str, shown: str) -> None:
    """Defect 17 (the other side): the wider patterns mask only the password."""
    assert redact(dsn) == shown
