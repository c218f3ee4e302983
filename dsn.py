"""DATABASE_URL: what it may be, how it is shown, and the forms asyncpg and yoyo take.

One URL serves the app's pool (asyncpg), the migration command (yoyo on psycopg 3) and every
message that names it; its password is masked wherever it is shown, however malformed it is.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit

DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")  # libpq's, as asyncpg reads them
_ESCAPE_HINT = "a password holding one of / ? # @ [ ] : must be percent-encoded"
# Seconds the migration command (libpq, which waits forever by default) gives a connection attempt,
# unless the URL sets connect_timeout: a black-holed host must not hang it. The app's own
# attempts are bounded by DATABASE_POOL_TIMEOUT.
CONNECT_TIMEOUT = 10
# libpq's keywords that asyncpg does not know: it would send them to the server as settings, which
# the server refuses ("unrecognized configuration parameter"), so the app could never connect.
# `connect_timeout` becomes asyncpg's own `timeout`; the values listed are what asyncpg does anyway,
# so they are left out of the app's connection (the migration command, on libpq, still reads them);
# any other value, or another of these keywords, is one asyncpg cannot honour: refused.
_LIBPQ_ONLY: dict[str, frozenset[str] | None] = {
    "channel_binding": frozenset({"disable", "prefer"}),  # asyncpg's SCRAM binds no channel
    "gssencmode": frozenset({"disable", "prefer"}),  # asyncpg does not encrypt with GSSAPI
    "keepalives": frozenset({"1"}),
    "sslcompression": frozenset({"0", "1"}),  # ignored by libpq itself since PostgreSQL 14
    "sslsni": frozenset({"1"}),
    "fallback_application_name": None,  # any value: the app names itself (application_name)
    **dict.fromkeys(("hostaddr", "require_auth", "keepalives_idle", "keepalives_interval", "keepalives_count",
                     "tcp_user_timeout", "replication", "requiressl", "sslkeylogfile", "sslcertmode",
                     "sslcrldir", "requirepeer", "gssdelegation", "load_balance_hosts"), frozenset()),
}  # fmt: skip


def _spelt(word: str) -> str:
    """A pattern for `word` as a query key may spell it: any letter percent-encoded (`%70assword`),
    which the drivers decode; with `re.IGNORECASE`, in either case."""
    return "".join(f"(?:{c}|%{ord(c.lower()):02x}|%{ord(c.upper()):02x})" for c in word)


# `password=` and `sslpassword=` in a query string or libpq's `key=value` form, the value quoted or not.
_QUERY_PASSWORD = re.compile(
    rf"((?:^|[&?\s])(?:{_spelt('ssl')})?{_spelt('password')}\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)", re.IGNORECASE
)


def check_url(raw: str) -> str:
    """`raw` if asyncpg and libpq can connect with it as written, else ValueError with the rule it breaks."""
    scheme = raw.partition("://")[0].lower()
    if "://" not in raw or scheme not in DATABASE_SCHEMES:
        raise ValueError("must start with postgresql://, postgres:// or postgresql+asyncpg://")
    try:
        parts = urlsplit(raw)
    except ValueError:
        raise ValueError(f"is not a valid URL ({_ESCAPE_HINT})") from None
    # `app:12/Secret@db`, `app:?Secret@db`: the password's rest read as the path or the query;
    # `app:hun@ter@db`: asyncpg and libpq end the password at the first `@`, yoyo at the last
    if "@" in parts.path or "@" in parts.query or parts.fragment or parts.netloc.count("@") > 1:
        raise ValueError(f"is not the URL it seems ({_ESCAPE_HINT})")
    if "%00" in raw:  # libpq's connection strings end at a NUL: the rest (the host, say) would be lost
        raise ValueError("holds %00 (a NUL byte), which no connection parameter can carry")
    # libpq's failover form names several hosts: `host1:5432,host2:5433`, IPv6 ones in brackets.
    for host in parts.netloc.rpartition("@")[2].split(","):
        port = _host_and_port(host)[1]
        if port and not (port.isascii() and port.isdigit()):  # `app:pass/word@db`: the password's `:` as the port's
            raise ValueError(f"has an invalid port ({_ESCAPE_HINT})")
        if port and not 0 < int(port) < 65536:
            raise ValueError("has an invalid port")
    sslmode = parse_qs(parts.query).get("sslmode", [None])[-1]
    if sslmode is not None and sslmode not in SSL_MODES:
        raise ValueError(f"has an unknown sslmode (one of {', '.join(SSL_MODES)})")
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "connect_timeout":
            if not (value.isascii() and value.isdigit() and int(value) > 0):
                raise ValueError("has a connect_timeout that is not a whole number of seconds above 0")
        elif key in _LIBPQ_ONLY and (allowed := _LIBPQ_ONLY[key]) is not None and value not in allowed:
            raise ValueError(f"sets {key}={value}, which the app's driver (asyncpg) cannot honour: remove it")
    return raw


def mask_url(url: str) -> str:
    """The URL with its passwords replaced by `***`, for messages and logs, however malformed it is.

    The password of the user part is masked, and every `password=` and `sslpassword=` (the query
    string, or libpq's `key=value` form, quoted or not). A URL that cannot be read for sure (an
    `@` after the host: a password with an unescaped `/`, `#` or `?`, or an `@` in the query)
    shows its scheme alone: masking too much there beats showing a password, or a wrong host.
    """
    masked = _QUERY_PASSWORD.sub(r"\1***", url)
    prefix = masked.partition("://")[0] + "://" if "://" in masked else ""
    try:
        netloc = urlsplit(masked).netloc
    except ValueError:
        return prefix + "***"
    rest = masked[len(prefix) + len(netloc) :] if masked.startswith(prefix + netloc) else masked
    if "@" in rest:
        return prefix + "***"
    userinfo, at, place = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{place}"
    return prefix + netloc + rest


def passwords(url: str) -> list[str]:
    """The passwords a database URL carries, as written: in the user part and in the query string."""
    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
    except ValueError:
        return []
    return found + [m.group(2).strip("'") for m in _QUERY_PASSWORD.finditer(parts.query) if m.group(2)]


def asyncpg_dsn(url: str) -> tuple[str, float | None]:
    """The URL as asyncpg takes it, and the connect timeout it sets (`connect_timeout`), if any.

    `postgresql+asyncpg://` (SQLAlchemy style) becomes `postgresql://`, and libpq's keywords
    asyncpg does not know are left out (`check_url` let through only those asyncpg honours anyway).
    """
    scheme, _, rest = url.partition("://")
    if scheme.lower() == "postgresql+asyncpg":
        url = f"postgresql://{rest}"
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(key, value) for key, value in query if key not in _LIBPQ_ONLY and key != "connect_timeout"]
    if len(kept) == len(query):
        return url, None
    timeout = next((float(value) for key, value in reversed(query) if key == "connect_timeout"), None)
    return parts._replace(query=urlencode(kept)).geturl(), timeout


def yoyo_url(url: str) -> str:
    """The app's URL for yoyo's psycopg 3 backend: the scheme changes (plus a connect timeout, and
    several hosts become libpq's `host=` and `port=` lists).

    `postgresql://` would select psycopg2, which is not installed; yoyo unquotes the user and
    password itself and hands query parameters to `psycopg.connect`.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not any(key == "connect_timeout" for key, _ in query):
        query.append(("connect_timeout", str(CONNECT_TIMEOUT)))
    userinfo, at, hosts = parts.netloc.rpartition("@")
    # libpq's failover form, and a socket directory written in the host (`%2Ftmp`), which yoyo
    # reads as a host name as it is: libpq's own host= and port= lists, the names unquoted.
    if "," in hosts or "%" in hosts:
        names, ports = zip(*(_host_and_port(host) for host in hosts.split(",")), strict=True)
        query += [("host", ",".join(map(unquote, names))), ("port", ",".join(port or "5432" for port in ports))]
        parts = parts._replace(netloc=userinfo + at)
    return parts._replace(scheme="postgresql+psycopg", query=urlencode(query)).geturl()


def _host_and_port(host: str) -> tuple[str, str]:
    """`db:5432` as (`db`, `5432`), `[::1]:5433` as (`::1`, `5433`); the port may be empty."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest.removeprefix(":")
    name, _, port = host.partition(":")
    return name, port
