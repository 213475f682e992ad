"""Connection strings: validation with clear errors, and redaction.

A DSN carries a password, so nothing here ever puts the raw string in a message:
errors name the field (``replicas[1]``) and show the redacted form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
from psycopg import conninfo

from .errors import ConfigurationError

__all__ = ["DsnInfo", "parse_dsn", "password_of", "redact", "scrub", "split_hosts"]

_URL_PASSWORD = re.compile(r"(?P<head>^[a-z][a-z0-9+.-]*://[^:/@?#]*:)(?P<pw>[^@/?#]*)(?=@)", re.I)
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|\S+)", re.I)
_URL_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<pw>[^&#]*)", re.I)
REDACTED = "***"


def redact(dsn: str) -> str:
    """Return ``dsn`` with any password replaced by ``***`` (URL or key=value form)."""
    out = _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED, dsn)
    out = _URL_QUERY_PASSWORD.sub(lambda m: m["head"] + REDACTED, out)
    return _KV_PASSWORD.sub(lambda m: m["head"] + REDACTED, out)


def password_of(dsn: str) -> str | None:
    """The password in ``dsn``, if any (``None`` also when ``dsn`` does not parse)."""
    try:
        value = conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        return None
    return str(value) if value else None


def scrub(text: str, password: str | None) -> str:
    """``text`` (an error message) with DSNs redacted and ``password`` masked anywhere:
    the server and libpq may quote it outside a DSN, where :func:`redact` cannot see it."""
    text = redact(text)
    return text.replace(password, REDACTED) if password else text


@dataclass(frozen=True, slots=True)
class DsnInfo:
    """What we show about a node: where it is, never how to log in."""

    host: str
    port: int
    dbname: str
    user: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_dsn(dsn: object, *, field: str) -> DsnInfo:
    """Validate one single-host DSN; a ``ConfigurationError`` names ``field``."""
    if not isinstance(dsn, str) or not dsn.strip():
        raise ConfigurationError(
            f"{field}: expected a non-empty DSN string, got {type(dsn).__name__}"
        )
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except Exception as exc:  # psycopg.ProgrammingError; its text may quote the DSN
        raise ConfigurationError(
            f"{field}: invalid DSN {redact(dsn)!r}: {redact(str(exc))}"
        ) from None
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    if "," in host:
        raise ConfigurationError(
            f"{field}: DSN {redact(dsn)!r} names several hosts; give one node per DSN "
            "or use Cluster.from_url() for a multi-host URL"
        )
    raw_port = str(params.get("port") or "5432")
    try:
        port = int(raw_port)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ConfigurationError(f"{field}: port {raw_port!r} in {redact(dsn)!r} is not 1-65535")
    user = str(params.get("user") or "")
    return DsnInfo(host=host, port=port, dbname=str(params.get("dbname") or user), user=user)


def split_hosts(url: str, *, field: str = "url") -> list[str]:
    """Split a libpq multi-host DSN into one DSN per host, other parameters kept."""
    try:
        params = conninfo.conninfo_to_dict(url)
    except Exception as exc:
        raise ConfigurationError(
            f"{field}: invalid DSN {redact(url)!r}: {redact(str(exc))}"
        ) from None
    hosts = str(params.pop("host", "") or "localhost").split(",")
    ports = str(params.pop("port", "") or "").split(",")
    if len(ports) not in (1, len(hosts)):
        raise ConfigurationError(
            f"{field}: {len(hosts)} hosts but {len(ports)} ports in {redact(url)!r}"
        )
    params.pop("target_session_attrs", None)  # we discover roles ourselves
    out = []
    for i, host in enumerate(hosts):
        port = ports[i] if len(ports) > 1 else ports[0]
        one = dict(params, host=host.strip() or "localhost")
        if port.strip():
            one["port"] = port.strip()
        out.append(conninfo.make_conninfo("", **one))
    return out
