"""Connection strings: validation with clear errors, and redaction.

A DSN carries a password, so nothing here ever puts the raw string in a message:
errors name the field (``replicas[1]``) and show the redacted form.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import conninfo

from .errors import ConfigurationError

__all__ = [
    "DsnInfo",
    "check_distinct",
    "parse_dsn",
    "password_of",
    "redact",
    "scrub",
    "split_hosts",
]

# Passwords in the shapes people write DSNs in, valid or not (an unparsable DSN is the
# one whose error message we must still show): a URL of any scheme anywhere in the text
# (libpq quotes the whole URL it choked on, after a leading space or inside quotes), a
# scheme-less "user:password@host", and key=value where an unquoted value runs on over
# spaces until the next "key=" (libpq stops at the space and quotes the rest).
_URL_PASSWORD = re.compile(
    r"(?P<head>(?<![\w+.-])[a-z][a-z0-9+.-]*://[^:/@?#\s'\"]*:)(?P<pw>[^@\s'\"]*)(?=@)", re.I
)
_BARE_PASSWORD = re.compile(
    r"(?P<head>(?:^|(?<=[\s'\"]))[^\s:/@=?#'\"]+:)(?!//)(?P<pw>[^@\s'\"]*)(?=@)"
)
_KV_PASSWORD = re.compile(
    r"(?P<head>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'?|\S+(?:\s+(?![\w.-]+\s*=)[^\s'\"]+)*)",
    re.I,
)
_URL_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<pw>[^&#\s'\"]*)", re.I)
# What libpq quotes in a parse error ('missing "=" after "..."', 'invalid
# percent-encoded token: "..."') may be a piece of the password; only an option name
# the DSN spells as "name=" is shown as it is.
_QUOTED = re.compile(r'"([^"]*)"')
REDACTED = "***"


def redact(dsn: str) -> str:
    """Return ``dsn`` with any password replaced by ``***`` (URL or key=value form,
    also when the DSN does not parse)."""
    out = _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED, dsn)
    out = _BARE_PASSWORD.sub(lambda m: m["head"] + REDACTED, out)
    out = _URL_QUERY_PASSWORD.sub(lambda m: m["head"] + REDACTED, out)
    return _KV_PASSWORD.sub(lambda m: m["head"] + REDACTED, out)


def _parse_error(dsn: str, field: str, exc: Exception) -> ConfigurationError:
    """The error for a DSN libpq cannot parse: redacted DSN, and of libpq's message
    only what cannot be a password (see ``_QUOTED``)."""
    names = {m.lower() for m in re.findall(r"([A-Za-z_]+)\s*=", dsn)}

    def quoted(match: re.Match[str]) -> str:
        text = match[1]
        return match[0] if text == "=" or text.lower() in names else f'"{REDACTED}"'

    reason = _QUOTED.sub(quoted, redact(str(exc).strip()))
    return ConfigurationError(f"{field}: invalid DSN {redact(dsn)!r}: {reason}")


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

    @property
    def target(self) -> str:
        """``host:port/dbname`` as written: two DSNs with the same target are one node
        (``localhost`` and ``127.0.0.1`` are not compared by what they resolve to)."""
        return f"{self.address}/{self.dbname}"


def parse_dsn(dsn: object, *, field: str) -> DsnInfo:
    """Validate one single-host DSN; a ``ConfigurationError`` names ``field``."""
    if not isinstance(dsn, str) or not dsn.strip():
        raise ConfigurationError(
            f"{field}: expected a non-empty DSN string, got {type(dsn).__name__}"
        )
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except Exception as exc:  # psycopg.ProgrammingError; its text may quote the DSN
        raise _parse_error(dsn, field, exc) from None
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


def check_distinct(dsns: Sequence[tuple[str, str, DsnInfo]]) -> None:
    """Reject two ``(field, dsn, info)`` entries that name one node.

    The same server listed twice (or the primary listed as a replica) would be
    monitored as two nodes that both claim its role: at run time that reads like a
    split brain, so it is a ``ConfigurationError`` naming both fields.
    """
    seen: dict[str, str] = {}
    for field, dsn, info in dsns:
        first = seen.setdefault(info.target, field)
        if first != field:
            raise ConfigurationError(
                f"{field} duplicates {first}: both connect to {info.target} "
                f"({redact(dsn)!r}); list each server once"
            )


def split_hosts(url: str, *, field: str = "url") -> list[str]:
    """Split a libpq multi-host DSN into one DSN per host, other parameters kept."""
    try:
        params = conninfo.conninfo_to_dict(url)
    except Exception as exc:
        raise _parse_error(url, field, exc) from None
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
