"""Settings: read once from the environment (with `.env` as fallback: envfile.py) into a frozen Struct.

Every variable is parsed on its own so that one start-up error can list every offending
variable at once; cross-variable rules live in `_check_environment_rules` (the metrics
directory's, which reads a variable that is not a setting, in `load_settings`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NoReturn, TypeVar
from urllib.parse import unquote

import msgspec

from dsn import check_url, mask_url, passwords

Environment = Literal["development", "staging", "production"]
T = TypeVar("T")

DEFAULT_LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MIN_SECRET_KEY_LENGTH = 32
MIN_MASKED_LENGTH = 6  # the shortest secret the log redactor masks: a shorter one would mask ordinary words
# The exit status of invalid settings: uvicorn's for a worker that failed to start (its
# STARTUP_FAILURE). `uvicorn --workers N`, which WEB_CONCURRENCY sets, stops on it; on any other
# status it starts the worker again, and would do so forever.
CONFIGURATION_ERROR = 3
# Placeholders that appear in documentation and templates; a key containing one is not secret.
SECRET_KEY_PLACEHOLDERS = ("change-me", "changeme", "change_me", "your-secret", "your_secret",
                           "secret-key-here", "replace-me", "placeholder", "example", "insecure", "goes-here",
                           "todo")  # fmt: skip
# A placeholder as a word of its own: inside a random key (`...xTODOq...`) letters or digits surround it.
_PLACEHOLDER = re.compile(rf"(?<![a-z0-9])(?:{'|'.join(map(re.escape, SECRET_KEY_PLACEHOLDERS))})(?![a-z0-9])")
# `'a' * 32` or `'secret' * 6` is long enough and still guessed at once; 32 hex digits have about 15.
MIN_SECRET_KEY_CHARACTERS = 10
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # one part of a host name (RFC 1123)
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s?#@*]+$")  # no user part, no wildcard: never sent
_ORIGIN_PARTS = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(?P<port>[0-9]{1,5}))?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_DEVELOPMENT: Environment = "development"
_ENVIRONMENTS: dict[str, Environment] = {"development": "development", "staging": "staging", "production": "production"}
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """The service's whole configuration; built by `load_settings`, passed explicitly."""

    app_name: str = "AgentifUI Pro API"
    app_version: str = "0.1.0"
    debug: bool = False
    environment: Environment = "development"
    database_url: str | None = None
    database_pool_size: int = 10
    database_pool_timeout: float = 30.0
    database_command_timeout: float = 30.0
    database_statement_cache_size: int = 100
    secret_key: str = msgspec.field(default_factory=lambda: secrets.token_urlsafe(48))
    secret_key_generated: bool = False
    # Variables that name no setting but look meant for one (`DATABSE_URL`, `database_url`), each
    # with the setting it resembles: nothing reads them, so start-up warns (`create_app`).
    unknown_variables: tuple[tuple[str, str], ...] = ()
    log_level: str = "INFO"
    log_format: str = DEFAULT_LOG_FORMAT
    log_json: bool = False
    cors_origins: tuple[str, ...] = ("http://localhost:3000",)
    cors_allow_credentials: bool = True
    health_check_timeout: float = 5.0
    database_health_check_timeout: float = 10.0
    enable_docs: bool = True
    enable_metrics: bool = True
    # The server's (`python -m app`): where to listen, how many workers, and the edge limits.
    host: str = "127.0.0.1"
    port: int = 8000
    web_concurrency: int = 1
    max_request_head_bytes: int = 65536
    request_head_timeout: float = 10.0
    max_body_bytes: int = 1048576
    shutdown_drain_seconds: float = 5.0

    def __repr__(self) -> str:
        """Safe to log: the key and the database password are masked."""
        fields = {f: getattr(self, f) for f in self.__struct_fields__}
        fields["secret_key"] = "***"  # noqa: S105 - the mask, not a password
        fields["database_url"] = mask_url(self.database_url) if self.database_url else None
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in fields.items())})"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in a response or a log line."""
        found = {self.secret_key}
        for password in passwords(self.database_url) if self.database_url else ():
            found |= {password, unquote(password)}
        return tuple(found)


# The variables the settings are read from: one a field, but for what start-up derives itself.
VARIABLES = frozenset(f.upper() for f in Settings.__struct_fields__) - {"SECRET_KEY_GENERATED", "UNKNOWN_VARIABLES"}
# Each field's default, written once (in the Struct above); the environment-dependent ones are given in `load_settings`.
_DEFAULTS = {f.name: f.default for f in msgspec.structs.fields(Settings) if f.default is not msgspec.NODEFAULT}
_UNSET: Any = object()


class Redactor:
    """Replaces secrets in a finished line or message: a backstop for text we do not control.

    A secret is replaced where it stands as a token of its own, not inside a longer word: a
    password `postgres` replaced inside `postgresql://` would garble the line and tell a reader
    of the logs what the password is, where the line itself never held it.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        # Very short values would redact ordinary words; such a secret is refused outside development.
        self.secrets = tuple(sorted({s for s in secrets if len(s) >= MIN_MASKED_LENGTH}, key=len, reverse=True))
        tokens = "|".join(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])" for s in self.secrets)
        self._tokens = re.compile(tokens or "(?!)")  # `(?!)` matches nothing

    def __call__(self, line: str) -> str:
        for secret in self.secrets:  # the substring test first: almost no line holds a secret, and it is cheaper
            if secret in line:
                return self._tokens.sub("***", line)
        return line


class SettingsError(Exception):
    """Raised with every problem found, one line each, so they can be fixed in one go."""

    def __init__(self, problems: list[str], unknown: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.unknown = tuple(unknown)  # (name, the setting it looks meant for): often the problem's cause

    def __str__(self) -> str:
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        hints = "".join(
            f"\n  ({name} is set but is not a setting: did you mean {meant}?)" for name, meant in self.unknown
        )
        return f"Invalid settings ({len(self.problems)} problem(s)):\n{lines}{hints}"


def load_settings(environ: Mapping[str, str], file_problems: Iterable[str] = ()) -> Settings:
    """Parse and validate every variable; raise `SettingsError` listing all problems, those of the
    `.env` file the variables came from (`envfile.read_environment`) first."""
    problems: list[str] = list(file_problems)

    def get(name: str, parse: Callable[[str], Any], default: Any = _UNSET, show: Callable[[str], str] = repr) -> Any:
        """The variable parsed by its rule; unset (or refused), the default: the field's own unless given."""
        if default is _UNSET:
            default = _DEFAULTS[name.lower()]
        raw = environ.get(name)
        if raw is None:
            return default
        try:
            raw.encode()  # the OS hands over bytes that are not UTF-8 as surrogates: no setting takes them
        except UnicodeEncodeError:
            problems.append(f"{name}={show(raw.encode(errors='surrogateescape').decode('latin-1'))}: is not UTF-8 text")
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            problems.append(f"{name}={show(raw)}: {exc}")
            return default

    environment: Environment = get("ENVIRONMENT", _environment)
    production = environment == "production"
    values = Settings(
        app_name=get("APP_NAME", _non_empty),
        app_version=get("APP_VERSION", _non_empty),
        debug=get("DEBUG", _boolean),
        environment=environment,
        # Empty is unset, as for SECRET_KEY: `.env.example` copied with a value left out must not stop development.
        database_url=get(
            "DATABASE_URL", lambda raw: check_url(raw) if raw else None, show=lambda raw: repr(mask_url(raw))
        ),
        database_pool_size=get("DATABASE_POOL_SIZE", _bounded(int, 1, 100)),
        database_pool_timeout=get("DATABASE_POOL_TIMEOUT", _positive),
        database_command_timeout=get("DATABASE_COMMAND_TIMEOUT", _bounded(float, 1, 3600)),
        database_statement_cache_size=get("DATABASE_STATEMENT_CACHE_SIZE", _bounded(int, 0, None)),
        secret_key=get("SECRET_KEY", str, "", show=lambda raw: "'***'"),
        log_level=get("LOG_LEVEL", _log_level),
        log_format=get("LOG_FORMAT", _log_format),
        log_json=get("LOG_JSON", _boolean, production),
        cors_origins=get("CORS_ORIGINS", _origins),
        cors_allow_credentials=get("CORS_ALLOW_CREDENTIALS", _boolean),
        health_check_timeout=get("HEALTH_CHECK_TIMEOUT", _bounded(float, 1, 30)),
        database_health_check_timeout=get("DATABASE_HEALTH_CHECK_TIMEOUT", _bounded(float, 1, 60)),
        enable_docs=get("ENABLE_DOCS", _boolean, not production),
        enable_metrics=get("ENABLE_METRICS", _boolean),
        host=get("HOST", _host),
        port=get("PORT", _bounded(int, 1, 65535)),
        web_concurrency=get("WEB_CONCURRENCY", _bounded(int, 1, 64)),
        max_request_head_bytes=get("MAX_REQUEST_HEAD_BYTES", _bounded(int, 1024, 1048576)),
        request_head_timeout=get("REQUEST_HEAD_TIMEOUT", _bounded(float, 1, 300)),
        max_body_bytes=get("MAX_BODY_BYTES", _bounded(int, 1, 1073741824)),
        shutdown_drain_seconds=get("SHUTDOWN_DRAIN_SECONDS", _bounded(float, 0, 120)),
        unknown_variables=_unknown_variables(environ),
    )
    # prometheus-client's own variable, read by it alone: a directory it cannot write is a traceback at start-up.
    shared = environ.get("PROMETHEUS_MULTIPROC_DIR")
    if shared and values.enable_metrics and not (os.path.isdir(shared) and os.access(shared, os.W_OK | os.X_OK)):
        problems.append(f"PROMETHEUS_MULTIPROC_DIR={shared!r}: must be an existing directory this process may write")
    # A variable whose value was refused is not reported a second time as missing.
    reported = {_variable(p) for p in problems}
    problems += [p for p in _check_environment_rules(values, environ) if _variable(p) not in reported]
    if problems:  # a misspelt name is said here too: create_app, which warns of it, never runs
        raise SettingsError(problems, values.unknown_variables)
    if not values.secret_key:
        return msgspec.structs.replace(values, secret_key=secrets.token_urlsafe(48), secret_key_generated=True)
    return values


def _unknown_variables(environ: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """Each variable that is no setting but looks meant for one, with that setting.

    A misspelt or lower-case name (`DATABSE_URL`, `WEB_CONCURENCY`, `database_url`) is read by
    nothing, and the service would start on the default without a word. Only one slip away
    counts (a letter missing, added, changed, or two swapped, in any case): the environment holds
    other programs' variables too (`DATABASE_USER`, `PGPORT`, `TEST_DATABASE_URL`).
    """
    found = []
    for name in environ:
        if name not in VARIABLES:
            found += [(name, meant) for meant in sorted(VARIABLES) if _one_slip(name.upper(), meant)][:1]
    return tuple(sorted(found))


def _one_slip(given: str, meant: str) -> bool:
    """Whether `given` is `meant`, or it with one letter missing, added or changed, or two adjacent swapped."""
    if abs(len(given) - len(meant)) > 1:
        return False
    same = 0  # the length of their common start
    while same < min(len(given), len(meant)) and given[same] == meant[same]:
        same += 1
    g, m = given[same:], meant[same:]
    return g == m or g[1:] in (m, m[1:]) or g == m[1:] or (g[:2] == m[1::-1] and g[2:] == m[2:])


def load_settings_or_exit(environ: Mapping[str, str], file_problems: Iterable[str] = ()) -> Settings:
    """`load_settings` for start-up: a configuration mistake is a message, not a traceback."""
    try:
        return load_settings(environ, file_problems)
    except SettingsError as exc:
        _exit_with(str(exc))


def _exit_with(message: str) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(CONFIGURATION_ERROR)


def _check_environment_rules(s: Settings, environ: Mapping[str, str]) -> list[str]:
    """Rules that involve more than one variable; unsafe production setups are refused here.

    Each names the variable with its value as it was set (`DEBUG='1'`), not as it was read.
    """
    problems = []
    if "*" in s.cors_origins and s.cors_allow_credentials:
        shown = environ.get("CORS_ORIGINS", "*")
        problems.append(f"CORS_ORIGINS={shown!r}: a wildcard origin is refused while CORS_ALLOW_CREDENTIALS is true")
    if s.environment == "development":
        return problems
    where = "in staging and production"
    if s.environment == "production" and s.debug:
        problems.append(f"DEBUG={environ.get('DEBUG', 'true')!r}: must be false in production")
    if s.database_url is None:
        state = "(unset)" if environ.get("DATABASE_URL") is None else "(empty)"
        problems.append(f"DATABASE_URL {state}: required {where}")
    elif any(len(unquote(password)) < MIN_MASKED_LENGTH for password in passwords(s.database_url)):
        problems.append(
            f"DATABASE_URL={mask_url(environ.get('DATABASE_URL', s.database_url))!r}: a password of fewer than "
            f"{MIN_MASKED_LENGTH} characters is refused {where}: the logs could not mask it (and it is weak)"
        )
    if not s.secret_key:
        state = "(unset)" if environ.get("SECRET_KEY") is None else "(empty)"
        problems.append(f"SECRET_KEY {state}: required {where}")
    elif len(s.secret_key) < MIN_SECRET_KEY_LENGTH:
        problems.append(
            f"SECRET_KEY='***' ({len(s.secret_key)} characters): must be at least "
            f"{MIN_SECRET_KEY_LENGTH} characters {where}"
        )
    elif _PLACEHOLDER.search(s.secret_key.lower()):
        problems.append(f"SECRET_KEY='***': looks like a documentation placeholder; generate a real key {where}")
    elif (distinct := len(set(s.secret_key))) < MIN_SECRET_KEY_CHARACTERS:
        problems.append(
            f"SECRET_KEY='***' ({distinct} different characters): too predictable, must use at least "
            f"{MIN_SECRET_KEY_CHARACTERS} {where}; generate one, e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(48))'"
        )
    return problems


def _variable(problem: str) -> str:
    """The variable a problem line is about: `NAME=...` or `NAME (unset)...`."""
    return problem.partition("=")[0].partition(" ")[0]


def _non_empty(raw: str) -> str:
    if not raw:
        raise ValueError("must not be empty")
    return raw


def _host(raw: str) -> str:
    """An address to bind: an IPv4 or IPv6 address, or a host name; no port (that is `PORT`)."""
    raw = _non_empty(raw)
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        # A name's last label is never all digits (RFC 1123): `10.0.0.300` is a mistyped address.
        if not _HOST_NAME.fullmatch(raw) or raw.rpartition(".")[2].isdigit():
            raise ValueError("must be an IP address or a host name, without a port (that is PORT)") from None
    return raw


def _boolean(raw: str) -> bool:
    try:
        return _BOOLEANS[raw.lower()]
    except KeyError:
        raise ValueError("must be a boolean: true/false, 1/0 or yes/no") from None


def _environment(raw: str) -> Environment:
    try:
        return _ENVIRONMENTS[raw.lower()]
    except KeyError:
        raise ValueError("must be one of development, staging, production") from None


def _bounded(kind: Callable[[str], T], low: float, high: float | None) -> Callable[[str], T]:
    name = "an integer" if kind is int else "a number"
    shown = [str(int(x)) if x == int(x) else f"{x:g}" for x in (low, high) if x is not None]  # no 1.04858e+06
    rule = f"must be {name} from {shown[0]} to {shown[1]}" if high is not None else f"must be {name} >= {shown[0]}"

    def parse(raw: str) -> T:
        try:
            value = kind(_plain_number(raw))
        except ValueError:
            raise ValueError(rule) from None
        number = float(value)  # type: ignore[arg-type]
        if number != number or number < low or (high is not None and number > high):
            raise ValueError(rule)
        return value

    return parse


def _plain_number(raw: str) -> str:
    """`raw` if written in ASCII digits without `_`: Python's `int` and `float` also take `8_000`
    and other scripts' digits (`٨٠٠٠`), which no other reader of the same variables would."""
    if not raw.isascii() or "_" in raw:
        raise ValueError(raw)
    return raw


def _positive(raw: str) -> float:
    try:
        value = float(_plain_number(raw))
    except ValueError:
        raise ValueError("must be a number of seconds > 0") from None
    if not 0 < value < float("inf"):
        raise ValueError("must be a number of seconds > 0")
    return value


def _log_level(raw: str) -> str:
    if raw.upper() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return raw.upper()


def _log_format(raw: str) -> str:
    if "%(message)" not in raw:
        raise ValueError("must contain %(message)s")
    # Formatted once here: a field no record has, or a stray `%`, would otherwise turn every
    # log line of the running service into a logging error on stderr.
    record = logging.LogRecord("service", logging.INFO, __file__, 1, "message", None, None)
    record.request_id = record.trace_id = None  # what the service adds to every record
    # The service leaves these out of records unless its format asks for them (logs.py): a sample.
    record.process, record.processName, record.thread, record.threadName = 1, "MainProcess", 1, "MainThread"
    try:
        logging.Formatter(raw).format(record)
    except (ValueError, TypeError) as exc:  # an unknown field is a ValueError since Python 3.8
        raise ValueError(f"must be a %-style logging format of LogRecord fields ({exc})") from None
    return raw


def _as_sent(origin: str) -> str:
    """An origin as a browser sends it: scheme and host in lowercase, the port as a number
    (`:0080` is `:80`), without the scheme's default one. Anything else is left for `_origins` to refuse."""
    origin = origin.strip().lower()
    parts = _ORIGIN_PARTS.fullmatch(origin)
    if parts is None or parts["port"] is None or not 0 < int(parts["port"]) < 65536:
        return origin
    port = int(parts["port"])
    default = _DEFAULT_PORTS.get(parts["scheme"]) == port
    return f"{parts['scheme']}://{parts['host']}" + ("" if default else f":{port}")


def _origins(raw: str) -> tuple[str, ...]:
    if raw.startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError("must be a JSON list of strings or a comma-separated list") from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError("must be a JSON list of strings or a comma-separated list")
    else:
        items = raw.split(",")
    origins = tuple(_as_sent(item) for item in items if item.strip())
    if foreign := [o for o in origins if not o.isascii()]:  # a browser sends the host in punycode
        raise ValueError(
            f"write each host as browsers send it, in ASCII (punycode: {', '.join(map(_punycode, foreign))})"
        )
    bad = [o for o in origins if o != "*" and not _is_origin(o)]
    if bad:
        raise ValueError(
            f"each origin must be '*' or scheme://host[:port], with no path, user or wildcard (bad: {', '.join(bad)})"
        )
    return origins


def _is_origin(origin: str) -> bool:
    """Whether `origin` (as `_as_sent` left it) is `scheme://host[:port]`, a port from 1 to 65535."""
    parts = _ORIGIN_PARTS.fullmatch(origin)
    return bool(_ORIGIN.match(origin) and parts and (parts["port"] is None or 0 < int(parts["port"]) < 65536))


def _punycode(origin: str) -> str:
    """`https://bücher.example` as browsers send it (`https://xn--bcher-kva.example`), for the message."""
    scheme, _, host = origin.partition("://")
    try:
        return f"{scheme}://{host.encode('idna').decode()}"
    except UnicodeError:
        return f"{origin}: not a host name"
