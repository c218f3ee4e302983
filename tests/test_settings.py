"""Settings: every variable's default and rule, and the production refusals."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from dotenv import dotenv_values

from app import create_app
from dsn import mask_url
from envfile import read_environment
from settings import (
    CONFIGURATION_ERROR,
    DEFAULT_LOG_FORMAT,
    VARIABLES,
    Redactor,
    SettingsError,
    load_settings,
    load_settings_or_exit,
)

ESCAPE_HINT = "a password holding one of / ? # @ [ ] : must be percent-encoded"
GOOD_KEY = "k" * 20 + "Zq81-x_m3LpRt0wY"  # 36 characters, no placeholder
PRODUCTION = {"ENVIRONMENT": "production", "SECRET_KEY": GOOD_KEY, "DATABASE_URL": "postgresql://u:pw-123456@db/app"}


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    return caught.value.problems


def test_defaults_match_the_contract() -> None:
    """With nothing set, every field has the contract's default."""
    s = load_settings({})
    assert s.app_name == "AgentifUI Pro API"
    assert s.app_version == "0.1.0"
    assert s.debug is False
    assert s.environment == "development"
    assert s.database_url is None
    assert (s.database_pool_size, s.database_pool_timeout, s.database_statement_cache_size) == (10, 30, 100)
    assert s.log_level == "INFO"
    assert s.log_format == DEFAULT_LOG_FORMAT
    assert s.log_json is False
    assert s.cors_origins == ("http://localhost:3000",)
    assert s.cors_allow_credentials is True
    assert (s.health_check_timeout, s.database_health_check_timeout) == (5, 10)
    assert s.enable_docs is True
    assert (s.host, s.port, s.web_concurrency) == ("127.0.0.1", 8000, 1)
    assert (s.max_request_head_bytes, s.request_head_timeout, s.max_body_bytes) == (65536, 10, 1048576)
    assert s.shutdown_drain_seconds == 5


def test_development_generates_a_secret_key_when_unset() -> None:
    """A missing key in development is replaced by a random one, flagged for a warning."""
    first, second = load_settings({}), load_settings({})
    assert first.secret_key_generated
    assert len(first.secret_key) >= 32
    assert first.secret_key != second.secret_key


def test_production_defaults_turn_json_logs_on_and_docs_off() -> None:
    """LOG_JSON and ENABLE_DOCS default by environment."""
    s = load_settings(PRODUCTION)
    assert s.log_json is True
    assert s.enable_docs is False


@pytest.mark.parametrize(("raw", "expected"), [("TRUE", True), ("1", True), ("Yes", True), ("no", False), ("0", False)])
def test_booleans_accept_the_contract_spellings(raw: str, expected: bool) -> None:
    """true/false, 1/0 and yes/no, in any case."""
    assert load_settings({"DEBUG": raw}).debug is expected


def test_boolean_rejects_other_words() -> None:
    """Anything else is an error naming the accepted spellings."""
    assert problems({"DEBUG": "maybe"}) == ["DEBUG='maybe': must be a boolean: true/false, 1/0 or yes/no"]


def test_environment_is_case_insensitive_and_checked() -> None:
    """ENVIRONMENT is one of three names, any case."""
    assert load_settings({"ENVIRONMENT": "Staging", **_safe()}).environment == "staging"
    assert problems({"ENVIRONMENT": "prod"}) == ["ENVIRONMENT='prod': must be one of development, staging, production"]


def test_app_name_and_version_must_not_be_empty() -> None:
    """Empty APP_NAME and APP_VERSION are refused, both reported."""
    assert problems({"APP_NAME": "", "APP_VERSION": " "}) == [
        "APP_NAME='': must not be empty",
        "APP_VERSION=' ': must not be empty",
    ]


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+asyncpg"])
def test_database_url_accepts_the_three_schemes(scheme: str) -> None:
    """The three PostgreSQL spellings are accepted as they are."""
    url = f"{scheme}://u:pw@localhost:5432/app"
    assert load_settings({"DATABASE_URL": url}).database_url == url


def test_database_url_rejects_other_schemes_with_the_password_masked() -> None:
    """A wrong scheme is reported with the URL's password masked."""
    [problem] = problems({"DATABASE_URL": "mysql://user:hunter2-secret@db/app"})
    assert problem == (
        "DATABASE_URL='mysql://user:***@db/app': must start with postgresql://, postgres:// or postgresql+asyncpg://"
    )


@pytest.mark.parametrize(("raw", "rule"), [("0", "from 1 to 100"), ("101", "from 1 to 100"), ("ten", "from 1 to 100")])
def test_pool_size_is_bounded(raw: str, rule: str) -> None:
    """DATABASE_POOL_SIZE is an integer from 1 to 100."""
    assert problems({"DATABASE_POOL_SIZE": raw}) == [f"DATABASE_POOL_SIZE={raw!r}: must be an integer {rule}"]


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "soon"])
def test_pool_timeout_must_be_positive(raw: str) -> None:
    """DATABASE_POOL_TIMEOUT is a finite number of seconds above zero."""
    assert problems({"DATABASE_POOL_TIMEOUT": raw}) == [
        f"DATABASE_POOL_TIMEOUT={raw!r}: must be a number of seconds > 0"
    ]


def test_statement_cache_size_may_be_zero_but_not_negative() -> None:
    """0 disables the cache (PgBouncer); negative is an error."""
    assert load_settings({"DATABASE_STATEMENT_CACHE_SIZE": "0"}).database_statement_cache_size == 0
    assert problems({"DATABASE_STATEMENT_CACHE_SIZE": "-1"}) == [
        "DATABASE_STATEMENT_CACHE_SIZE='-1': must be an integer >= 0"
    ]


def test_log_level_is_one_of_five_names_any_case() -> None:
    """LOG_LEVEL is normalised to upper case; unknown levels are refused."""
    assert load_settings({"LOG_LEVEL": "warning"}).log_level == "WARNING"
    assert problems({"LOG_LEVEL": "loud"}) == ["LOG_LEVEL='loud': must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"]


def test_log_format_must_place_the_message() -> None:
    """A LOG_FORMAT without %(message)s would drop every message."""
    assert problems({"LOG_FORMAT": "%(levelname)s"}) == ["LOG_FORMAT='%(levelname)s': must contain %(message)s"]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("%(message)s %(bogus)s", "Formatting field not found in record: 'bogus'"),
        ("%(message)s 100%", "incomplete format"),
        ("%(message)d", "%d format: a real number is required, not str"),
    ],
)
def test_log_format_that_no_record_can_fill_is_refused(raw: str, reason: str) -> None:
    """Refused at start-up: running, every log line would become a logging error on stderr instead."""
    assert problems({"LOG_FORMAT": raw}) == [
        f"LOG_FORMAT={raw!r}: must be a %-style logging format of LogRecord fields ({reason})"
    ]


def test_log_format_may_place_the_request_and_trace_ids() -> None:
    raw = "%(asctime)s %(levelname)s %(request_id)s %(trace_id)s %(message)s"
    assert load_settings({"LOG_FORMAT": raw}).log_format == raw


def test_cors_origins_accept_json_and_comma_lists() -> None:
    """Both spellings give the same tuple."""
    expected = ("https://a.example", "http://localhost:8080")
    assert load_settings({"CORS_ORIGINS": '["https://a.example", "http://localhost:8080"]'}).cors_origins == expected
    assert load_settings({"CORS_ORIGINS": "https://a.example, http://localhost:8080"}).cors_origins == expected


def test_cors_origins_are_read_as_browsers_send_them() -> None:
    """Lowercase, without the default port: `Origin: https://a.example` matches what was configured."""
    origins = load_settings({"CORS_ORIGINS": "HTTPS://A.Example:443, http://B.example:80, http://c.example:8080, "
                                             "http://localhost:0080, http://[::1]:03000"})  # fmt: skip
    assert origins.cors_origins == ("https://a.example", "http://b.example", "http://c.example:8080",
                                    "http://localhost", "http://[::1]:3000")  # fmt: skip


@pytest.mark.parametrize("origin", ["https://*.example.com", "https://user:pw@a.example", "http://a.example:99999",
                                    "http://a.example:"])  # fmt: skip
def test_cors_origins_that_no_browser_sends_are_refused(origin: str) -> None:
    [problem] = problems({"CORS_ORIGINS": origin})
    assert "each origin must be '*' or scheme://host[:port], with no path, user or wildcard" in problem


def test_a_cors_origin_of_an_international_host_is_refused_with_the_form_browsers_send() -> None:
    """Browsers send the host in punycode: `bücher.example` as written would never match, so it is refused."""
    [problem] = problems({"CORS_ORIGINS": "https://bücher.example"})
    assert problem.endswith("write each host as browsers send it, in ASCII (punycode: https://xn--bcher-kva.example)")


def test_cors_origin_with_a_path_is_refused() -> None:
    """A trailing slash never matches a browser's Origin header, so it is an error, not a silent miss."""
    [problem] = problems({"CORS_ORIGINS": "https://a.example/"})
    assert problem.startswith("CORS_ORIGINS='https://a.example/': each origin must be")


def test_cors_wildcard_is_refused_with_credentials() -> None:
    """`*` with credentials would let any site make credentialed requests."""
    assert problems({"CORS_ORIGINS": "*"}) == [
        "CORS_ORIGINS='*': a wildcard origin is refused while CORS_ALLOW_CREDENTIALS is true"
    ]
    assert load_settings({"CORS_ORIGINS": "*", "CORS_ALLOW_CREDENTIALS": "false"}).cors_origins == ("*",)


@pytest.mark.parametrize(
    ("name", "raw", "rule"),
    [
        ("HEALTH_CHECK_TIMEOUT", "0.5", "must be a number from 1 to 30"),
        ("HEALTH_CHECK_TIMEOUT", "31", "must be a number from 1 to 30"),
        ("DATABASE_HEALTH_CHECK_TIMEOUT", "61", "must be a number from 1 to 60"),
        ("DATABASE_HEALTH_CHECK_TIMEOUT", "x", "must be a number from 1 to 60"),
    ],
)
def test_health_timeouts_are_bounded(name: str, raw: str, rule: str) -> None:
    """The health bounds keep a probe from being either instant-fail or endless."""
    assert problems({name: raw}) == [f"{name}={raw!r}: {rule}"]


@pytest.mark.parametrize(
    ("name", "raw", "rule"),
    [
        ("PORT", "0", "must be an integer from 1 to 65535"),
        ("PORT", "65536", "must be an integer from 1 to 65535"),
        ("WEB_CONCURRENCY", "0", "must be an integer from 1 to 64"),
        ("WEB_CONCURRENCY", "65", "must be an integer from 1 to 64"),
        ("MAX_REQUEST_HEAD_BYTES", "1023", "must be an integer from 1024 to 1048576"),
        ("MAX_REQUEST_HEAD_BYTES", "1048577", "must be an integer from 1024 to 1048576"),
        ("REQUEST_HEAD_TIMEOUT", "0.5", "must be a number from 1 to 300"),
        ("REQUEST_HEAD_TIMEOUT", "301", "must be a number from 1 to 300"),
        ("MAX_BODY_BYTES", "0", "must be an integer from 1 to 1073741824"),
        ("MAX_BODY_BYTES", "1073741825", "must be an integer from 1 to 1073741824"),
        ("SHUTDOWN_DRAIN_SECONDS", "-1", "must be a number from 0 to 120"),
        ("SHUTDOWN_DRAIN_SECONDS", "121", "must be a number from 0 to 120"),
        ("HOST", "", "must not be empty"),
    ],
)
def test_server_settings_are_bounded(name: str, raw: str, rule: str) -> None:
    """The server and edge-limit variables refuse values outside the contract's ranges, naming the rule."""
    assert problems({name: raw}) == [f"{name}={raw!r}: {rule}"]


def test_server_settings_accept_their_bounds() -> None:
    """The ends of each range are valid values."""
    ends = {"PORT": "65535", "WEB_CONCURRENCY": "64", "MAX_REQUEST_HEAD_BYTES": "1024", "REQUEST_HEAD_TIMEOUT": "300"}
    s = load_settings({**ends, "MAX_BODY_BYTES": "1", "SHUTDOWN_DRAIN_SECONDS": "0"})
    assert (s.port, s.web_concurrency, s.max_request_head_bytes) == (65535, 64, 1024)
    assert (s.request_head_timeout, s.max_body_bytes, s.shutdown_drain_seconds) == (300, 1, 0)


def test_production_refuses_debug() -> None:
    """DEBUG=true would put tracebacks in production responses."""
    assert problems({**PRODUCTION, "DEBUG": "true"}) == ["DEBUG='true': must be false in production"]


@pytest.mark.parametrize("environment", ["staging", "production"])
def test_staging_and_production_require_database_url_and_secret_key(environment: str) -> None:
    """Both are required outside development, and both are reported together."""
    assert problems({"ENVIRONMENT": environment}) == [
        "DATABASE_URL (unset): required in staging and production",
        "SECRET_KEY (unset): required in staging and production",
    ]


def test_production_refuses_a_short_secret_key_without_showing_it() -> None:
    """The rule is stated; the value is masked."""
    [problem] = problems({**PRODUCTION, "SECRET_KEY": "short-but-secret"})
    assert problem == "SECRET_KEY='***' (16 characters): must be at least 32 characters in staging and production"


def test_production_refuses_a_placeholder_secret_key() -> None:
    """A long key copied from the docs is not a secret."""
    [problem] = problems({**PRODUCTION, "SECRET_KEY": "change-me-to-a-long-random-string-please"})
    assert problem.startswith("SECRET_KEY='***': looks like a documentation placeholder")


@pytest.mark.parametrize("url", ["postgresql://app:pw123@db/app", "postgresql://app@db/app?password=pw123"])
def test_a_database_password_too_short_to_mask_is_refused_outside_development(url: str) -> None:
    """The log redactor leaves secrets under 6 characters alone (it would mask ordinary words): such a
    password was accepted in production and written unmasked in every line that named the URL."""
    for environment in ("staging", "production"):
        assert problems({**PRODUCTION, "ENVIRONMENT": environment, "DATABASE_URL": url}) == [
            f"DATABASE_URL={mask_url(url)!r}: a password of fewer than 6 characters is refused in staging and "
            "production: the logs could not mask it (and it is weak)"
        ]
    assert load_settings({"DATABASE_URL": url}).database_url == url  # development: a local database's


def test_a_refusal_shows_each_value_as_it_was_set() -> None:
    """`DEBUG=1` is named as `'1'`, an empty key as empty (it was set), a list with a wildcard whole."""
    env = {"ENVIRONMENT": "production", "DATABASE_URL": "postgresql://u:pw-1234@db/app", "DEBUG": "1", "SECRET_KEY": "",
           "CORS_ORIGINS": "https://a.example, *"}  # fmt: skip
    assert problems(env) == [
        "CORS_ORIGINS='https://a.example, *': a wildcard origin is refused while CORS_ALLOW_CREDENTIALS is true",
        "DEBUG='1': must be false in production",
        "SECRET_KEY (empty): required in staging and production",
    ]


def test_a_random_key_that_happens_to_spell_a_placeholder_is_accepted() -> None:
    """`secrets.token_urlsafe(48)` spells `todo` about once in 20,000 keys: inside a word it is no placeholder."""
    for key in ("Qx7TODOq" + GOOD_KEY, "Zq81-x_m3LpRt0wYexample" + GOOD_KEY):
        assert load_settings({**PRODUCTION, "SECRET_KEY": key}).secret_key == key
    [problem] = problems({**PRODUCTION, "SECRET_KEY": GOOD_KEY + "-todo"})
    assert problem.startswith("SECRET_KEY='***': looks like a documentation placeholder")


def test_a_value_that_is_not_utf_8_is_refused_not_a_traceback() -> None:
    """The OS hands bytes that are not UTF-8 over as surrogates, which nothing downstream can encode."""
    [problem] = problems({"APP_NAME": "caf\udce9"})
    assert problem == "APP_NAME='café': is not UTF-8 text"


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_a_prometheus_directory_that_cannot_be_written_is_a_settings_problem(tmp_path: Path, kind: str) -> None:
    """prometheus-client would fail on it with a traceback at start-up; said in the one message instead."""
    shared = tmp_path / "missing"
    if kind == "a file":
        shared.write_text("")
    [problem] = problems({"PROMETHEUS_MULTIPROC_DIR": str(shared)})
    assert problem == f"PROMETHEUS_MULTIPROC_DIR='{shared}': must be an existing directory this process may write"
    assert load_settings({"PROMETHEUS_MULTIPROC_DIR": str(shared), "ENABLE_METRICS": "false"}).enable_metrics is False


def test_a_misspelt_variable_is_named_in_the_message_that_stops_start_up() -> None:
    """The warning create_app would log never comes when start-up fails: the refusal names the near miss itself."""
    with pytest.raises(SettingsError) as caught:
        load_settings(
            {"ENVIRONMENT": "production", "SECRET_KEY": GOOD_KEY, "DATABSE_URL": "postgresql://u:pw-123456@db/app"}
        )
    assert str(caught.value) == (
        "Invalid settings (1 problem(s)):\n"
        "  DATABASE_URL (unset): required in staging and production\n"
        "  (DATABSE_URL is set but is not a setting: did you mean DATABASE_URL?)"
    )


@pytest.mark.parametrize("key", ["a" * 32, "secret" * 6, "password" * 4, "0123456" * 5])
def test_a_secret_key_of_few_different_characters_is_refused_in_production(key: str) -> None:
    """Long enough, and still guessed at once: refused, without showing it."""
    [problem] = problems({**PRODUCTION, "SECRET_KEY": key})
    assert problem.startswith(f"SECRET_KEY='***' ({len(set(key))} different characters): too predictable")
    assert key not in problem


def test_every_problem_is_reported_at_once() -> None:
    """One start-up attempt names every offending variable."""
    env = {"ENVIRONMENT": "production", "DEBUG": "yes", "DATABASE_POOL_SIZE": "0", "CORS_ORIGINS": "*"}
    found = problems(env)
    assert [p.split("=")[0].split(" ")[0] for p in found] == [
        "DATABASE_POOL_SIZE",
        "CORS_ORIGINS",
        "DEBUG",
        "DATABASE_URL",
        "SECRET_KEY",
    ]


def test_an_invalid_variable_is_reported_once() -> None:
    """A refused DATABASE_URL is not also reported as missing in production."""
    found = problems({**PRODUCTION, "DATABASE_URL": "mysql://u:pw@db/app"})
    assert len(found) == 1
    assert found[0].startswith("DATABASE_URL='mysql://u:***@db/app': must start with")


def test_secrets_lists_the_key_and_the_database_password() -> None:
    """Both secrets, the password also in its decoded form, are known to the log redactor."""
    s = load_settings({**PRODUCTION, "DATABASE_URL": "postgresql://u:p%40ss-word@db/app"})
    assert set(s.secrets) == {GOOD_KEY, "p%40ss-word", "p@ss-word"}


def test_the_redactor_replaces_a_secret_only_where_it_stands_as_a_token_of_its_own() -> None:
    """A password that is also part of a word (`postgres` in `postgresql://`) is not replaced inside
    it: that would garble the line and tell its reader the password."""
    redact = Redactor(["postgres", "Qu@ry-Secret-99"])
    assert redact("cannot connect to postgresql://app:***@db/app") == "cannot connect to postgresql://app:***@db/app"
    assert redact('password authentication failed for user "postgres"') == (
        'password authentication failed for user "***"'
    )
    assert redact("dsn=postgresql://app:Qu@ry-Secret-99@db/app") == "dsn=postgresql://app:***@db/app"
    assert redact("nothing secret here") == "nothing secret here"


def test_mask_url_hides_only_the_password() -> None:
    """User, host and database stay readable for operators."""
    assert mask_url("postgresql://app:s3cr3t@db.internal:5432/prod") == "postgresql://app:***@db.internal:5432/prod"
    assert mask_url("postgresql://db/prod") == "postgresql://db/prod"


def test_an_at_sign_after_the_host_never_shows_another_host() -> None:
    """`@` in the query cannot be told from a password with an unescaped `/`: the URL is shown masked whole."""
    url = "postgresql://app:s3cret@db.example.com:5432/app?sslrootcert=/etc/ssl/me@corp/ca.pem"
    assert mask_url(url) == "postgresql://***"
    assert mask_url("postgresql://app:pw@db1:5432,[::1]:5433/app") == "postgresql://app:***@db1:5432,[::1]:5433/app"


def test_a_password_in_the_query_string_is_masked_and_kept_secret() -> None:
    """libpq and asyncpg read `?password=` too: it is masked in messages and redacted from logs."""
    url = "postgresql://app@db:5432/prod?sslmode=require&password=Qu%40ry-Secret-99"
    assert mask_url(url) == "postgresql://app@db:5432/prod?sslmode=require&password=***"
    assert {"Qu%40ry-Secret-99", "Qu@ry-Secret-99"} <= set(load_settings({"DATABASE_URL": url}).secrets)
    [problem] = problems({"DATABASE_URL": "postgresql://app@db:99999/prod?password=Qu-Secret-99"})
    assert problem == "DATABASE_URL='postgresql://app@db:99999/prod?password=***': has an invalid port"


@pytest.mark.parametrize("key", ["%70assword", "pass%77ord", "PASSWORD", "%53%53Lpassword"])
def test_a_query_password_however_its_key_is_spelt_is_masked_and_kept_secret(key: str) -> None:
    """The drivers decode a percent-encoded key (`%70assword` is `password`): it is masked all the same."""
    url = f"postgresql://app@db:5432/prod?sslmode=require&{key}=Qu%40ry-Secret-99"
    assert mask_url(url) == f"postgresql://app@db:5432/prod?sslmode=require&{key}=***"
    assert {"Qu%40ry-Secret-99", "Qu@ry-Secret-99"} <= set(load_settings({"DATABASE_URL": url}).secrets)


@pytest.mark.parametrize(
    "url",
    [
        "app:TopSecretPw1@db.internal:5432/app",  # no scheme
        "postgresql//app:TopSecretPw1@db.internal/app",
        "postgresql://app:Top/SecretPw1@db.internal:5432/app",  # an unescaped `/`: the URL does not parse
        "postgresql://app:Top#Secret?Pw1@db.internal:5432/app",
        "host=db.internal user=app password=TopSecretPw1 dbname=app",  # libpq's keyword form
        "postgresql://app@db:99999/app?sslpassword=TopSecretPw1",
        "host=db user=app password='Top Secret Pw1' dbname=app",  # quoted, with blanks
        "postgresql://app:12/Secret@db:99999/app",  # `12` read as a port, the rest as the path
        "postgresql://app:?TopSecretPw1@db.internal:5432/app",  # an unescaped `?`: the rest read as the query
        # an unescaped `@`: asyncpg would take `Pw1@db.internal` for the host and ask DNS for it
        "postgresql://app:TopSecret@Pw1@db.internal:5432/app",
        "postgresql://app:TopSecret%00Pw1@db.internal:5432/app",  # libpq would lose the host after the NUL
    ],
)
def test_a_refused_database_url_never_shows_its_password(url: str) -> None:
    """However malformed the URL, the refusal shows it with the password masked, never in clear."""
    [problem] = problems({"DATABASE_URL": url})
    assert problem.startswith("DATABASE_URL='")
    assert "Secret" not in problem
    assert "***" in problem


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:pw@db1:5432,db2:5433/app",  # libpq's failover form
        "postgresql://app:pw@db1,[::1]:5433/app",
        "postgresql://app:pw@db/app?sslmode=verify-full",
        "postgresql:///app?host=/run/postgresql",
        # libpq's own options where asyncpg does the same anyway (Neon's and RDS's URLs carry some)
        "postgresql://app:pw@db/app?sslmode=require&channel_binding=prefer&connect_timeout=5&keepalives=1",
    ],
)
def test_database_urls_that_asyncpg_connects_with_are_accepted(url: str) -> None:
    assert load_settings({"DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("postgresql://app:pw@db1:5432,db2:99999/app", "has an invalid port"),
        ("postgresql://app:pw@db/app?sslmode=bogus", "has an unknown sslmode (one of disable, allow, prefer, "
                                                    "require, verify-ca, verify-full)"),
        ("postgresql://app:pass/word@db/app", f"is not the URL it seems ({ESCAPE_HINT})"),
        ("postgresql://app:pw@db:\u0665\u0664\u0663\u0662/app", f"has an invalid port ({ESCAPE_HINT})"),  # Arabic-Indic
        ("postgresql://app:pw@db:5x32/app", f"has an invalid port ({ESCAPE_HINT})"),
        ("postgresql://app:?pw@db/app", f"is not the URL it seems ({ESCAPE_HINT})"),
        ("postgresql://app:pw@db/app?channel_binding=require", "sets channel_binding=require, which the app's "
                                                               "driver (asyncpg) cannot honour: remove it"),
        ("postgresql://app:pw@db/app?keepalives_idle=30", "sets keepalives_idle=30, which the app's driver "
                                                          "(asyncpg) cannot honour: remove it"),
        ("postgresql://app:pw@db/app?connect_timeout=0", "has a connect_timeout that is not a whole number of "
                                                         "seconds above 0"),
    ],
)  # fmt: skip
def test_database_urls_that_could_never_connect_are_refused_with_the_reason(url: str, rule: str) -> None:
    """Refused at start-up, rather than every probe failing with a configuration error."""
    [problem] = problems({"DATABASE_URL": url})
    assert problem.endswith(f"': {rule}")
    assert ":pw@" not in problem
    assert "pass/word" not in problem


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "127.0.0.1", "::1", "localhost", "api-1.internal.example"])  # noqa: S104 - read, not bound
def test_host_takes_addresses_and_names(host: str) -> None:
    assert load_settings({"HOST": host}).host == host


@pytest.mark.parametrize("host", ["0.0.0.0:80", "not a host!!", "[::1]", "-bad.example", "10.0.0.300", "256.1.1.1"])
def test_host_with_a_port_or_not_a_name_is_refused(host: str) -> None:
    """Refused with the other settings, before binding, rather than an error from the server naming no variable."""
    assert problems({"HOST": host}) == [
        f"HOST={host!r}: must be an IP address or a host name, without a port (that is PORT)"
    ]


def refused(env_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The lines start-up writes when reading `env_file` stops it, with the configuration error's status."""
    monkeypatch.delenv("PYTHON_DOTENV_DISABLED", raising=False)
    with pytest.raises(SystemExit) as exit_:
        load_settings_or_exit(*read_environment(env_file))
    assert exit_.value.code == CONFIGURATION_ERROR
    return capsys.readouterr().err.splitlines()


def test_an_unreadable_dotenv_is_one_message_and_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `.env` that is not UTF-8 is a configuration mistake, not a traceback (and uvicorn stops its workers)."""
    env_file = tmp_path / ".env"
    env_file.write_bytes(b"APP_NAME=caf\xe9\n")
    assert refused(env_file, monkeypatch, capsys) == [
        "Invalid settings (1 problem(s)):",
        f"  {env_file}: cannot be read (not UTF-8 text)",
    ]


def test_a_prometheus_directory_in_dotenv_is_refused_as_prometheus_never_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """prometheus-client reads it from the process environment only: in `.env` every worker would count alone."""
    env_file = tmp_path / ".env"
    env_file.write_text(f"PROMETHEUS_MULTIPROC_DIR={tmp_path}\n")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert refused(env_file, monkeypatch, capsys)[1] == (
        f"  {env_file}: sets PROMETHEUS_MULTIPROC_DIR, which prometheus-client reads from the server's environment "
        "alone: set it there"
    )
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # set in the environment too: the environment's
    assert read_environment(env_file)[0]["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)


def test_a_dotenv_line_that_cannot_be_parsed_stops_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """python-dotenv would skip it and start without it: here an unclosed quote is refused, named, not shown."""
    env_file = tmp_path / ".env"
    env_file.write_text('DEBUG=false\nexport SECRET_KEY="s3cr3t-value\nENVIRONMENT=production\n')
    assert refused(env_file, monkeypatch, capsys) == [  # the next line is read: production, and what it needs
        "Invalid settings (3 problem(s)):",
        f"  {env_file}, line 2 (SECRET_KEY): cannot be parsed as NAME=value (an unclosed quote?)",
        "  DATABASE_URL (unset): required in staging and production",
        "  SECRET_KEY (unset): required in staging and production",
    ]


def test_a_dotenv_line_that_cannot_be_parsed_is_reported_with_every_other_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The `.env` file's problem stopped start-up alone: the variables' own came only at the next try."""
    env_file = tmp_path / ".env"
    env_file.write_text('APP_NAME=ok\nDEBUG="yes\n')
    monkeypatch.setenv("PORT", "0")
    monkeypatch.setenv("DATABASE_POOL_SIZE", "0")
    assert refused(env_file, monkeypatch, capsys) == [
        "Invalid settings (3 problem(s)):",
        f"  {env_file}, line 2 (DEBUG): cannot be parsed as NAME=value (an unclosed quote?)",
        "  DATABASE_POOL_SIZE='0': must be an integer from 1 to 100",
        "  PORT='0': must be an integer from 1 to 65535",
    ]


def test_a_dotenv_expands_names_from_the_environment_first_and_keeps_single_quoted_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`${DB_PASS}` took the file's DB_PASS though the environment set it (the environment always wins); a
    single-quoted password holding `${` was expanded, as no shell or Compose does; a name set nowhere read
    as empty, silently."""
    env_file = tmp_path / ".env"
    env_file.write_text(
        "DB_PASS=from-the-file\n"
        "DATABASE_URL=postgresql://app:${DB_PASS}@db/app\n"
        "SECRET_KEY='pa${X}yz-$$-long'\n"
        'APP_NAME="api-${REGION:-eu}"\n'
        "APP_VERSION=v${BUILD}\n"
        "LOG_LEVEL=${LEVEL}\n"  # set again below: its first line is not read
        "LOG_LEVEL=info\n"
        "ENABLE_DOCS=${DOCS}\n"  # the environment's ENABLE_DOCS is read, not this line
        "COMPOSE_PROJECT_NAME=${SUFFIX}\n"  # another tool's variable: left as python-dotenv reads it
        "DEBUG=true\n"
        "DEBUG\n"  # a name alone unsets it
    )
    monkeypatch.setenv("ENABLE_DOCS", "false")
    monkeypatch.delenv("PYTHON_DOTENV_DISABLED", raising=False)
    monkeypatch.setenv("DB_PASS", "from-the-environment")
    values, file_problems = read_environment(env_file)
    assert values["DATABASE_URL"] == "postgresql://app:from-the-environment@db/app"
    assert values["SECRET_KEY"] == "pa${X}yz-$$-long"
    assert values["APP_NAME"] == "api-eu"
    assert "DEBUG" not in values
    assert file_problems == [
        f"{env_file}, line 5 (APP_VERSION): ${{BUILD}} is set neither in the environment nor above it in the "
        "file, and would read as empty: set it, or single-quote the value to keep it as written"
    ]


@pytest.mark.parametrize("written", ["8_000", "\u0668\u0660\u0660\u0660", "\uff18\uff10\uff10\uff10"])
def test_a_number_is_written_in_ascii_digits(written: str) -> None:
    """Python's `int` read `8_000`, Arabic-Indic and full-width digits as 8000: no shell or other tool would."""
    assert problems({"PORT": written, "DATABASE_POOL_TIMEOUT": written}) == [
        f"DATABASE_POOL_TIMEOUT={written!r}: must be a number of seconds > 0",
        f"PORT={written!r}: must be an integer from 1 to 65535",
    ]


def test_an_empty_database_url_is_unset_as_an_empty_secret_key_is() -> None:
    """`DATABASE_URL=` (`.env.example` copied with the value left out) stopped development start-up."""
    assert load_settings({"DATABASE_URL": ""}).database_url is None
    assert problems({**PRODUCTION, "DATABASE_URL": " "}) == ["DATABASE_URL (empty): required in staging and production"]


def test_a_dotenv_that_links_to_nothing_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`.env` linked to a secret that is not mounted was skipped without a word: development started on defaults."""
    env_file = tmp_path / ".env"
    env_file.symlink_to(tmp_path / "secrets" / "app.env")
    monkeypatch.delenv("PYTHON_DOTENV_DISABLED", raising=False)
    assert read_environment(env_file)[1] == [
        f"{env_file}: is a link to {tmp_path / 'secrets' / 'app.env'}, which does not exist"
    ]


def test_a_dotenv_mounted_as_a_pipe_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets managers may mount `.env` as a named pipe: read like a file."""
    env_file = tmp_path / ".env"
    os.mkfifo(env_file)
    writer = threading.Thread(target=lambda: env_file.write_text("APP_NAME=from-a-pipe\n"))
    writer.start()
    monkeypatch.delenv("PYTHON_DOTENV_DISABLED", raising=False)
    try:
        assert read_environment(env_file)[0]["APP_NAME"] == "from-a-pipe"
    finally:
        writer.join(5)


def test_environment_wins_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`.env` is only a fallback: a real variable always wins."""
    env_file = tmp_path / ".env"
    env_file.write_text("APP_NAME=from-dotenv\nAPP_VERSION=9.9.9\n")
    monkeypatch.delenv("PYTHON_DOTENV_DISABLED", raising=False)  # conftest sets it for the suite
    monkeypatch.setenv("APP_NAME", "from-environment")
    values, _ = read_environment(env_file)
    assert (values["APP_NAME"], values["APP_VERSION"]) == ("from-environment", "9.9.9")


def test_python_dotenv_disabled_leaves_dotenv_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`PYTHON_DOTENV_DISABLED=1` ignores `.env` entirely; the real environment still counts."""
    env_file = tmp_path / ".env"
    env_file.write_text("APP_NAME=from-dotenv\nAPP_VERSION=9.9.9\n")
    monkeypatch.setenv("PYTHON_DOTENV_DISABLED", "1")
    monkeypatch.setenv("APP_NAME", "from-environment")
    values, _ = read_environment(env_file)
    assert values["APP_NAME"] == "from-environment"
    assert "APP_VERSION" not in values


def test_a_misspelt_or_lower_case_variable_is_named_with_the_setting_it_resembles() -> None:
    """Nothing reads `DATABSE_URL` or `database_url`: the settings keep their defaults and name the near misses."""
    env = {"DATABSE_URL": "postgresql://u:pw@db/app", "database_url": "postgresql://u:pw@db/app", "WEB_CONCURENCY": "4",
           "DATABASE_ULR": "postgresql://u:pw@db/app"}  # fmt: skip
    settings = load_settings(env)
    assert settings.database_url is None
    assert settings.web_concurrency == 1
    assert settings.unknown_variables == (
        ("DATABASE_ULR", "DATABASE_URL"),
        ("DATABSE_URL", "DATABASE_URL"),
        ("WEB_CONCURENCY", "WEB_CONCURRENCY"),
        ("database_url", "DATABASE_URL"),
    )


def test_other_programs_variables_are_not_taken_for_misspelt_settings(tmp_path: Path) -> None:
    """The environment holds libpq's, Kubernetes' and the shell's variables too: none of them is a near miss."""
    others = ["PATH", "HOME", "HOSTNAME", "PGPORT", "PGHOST", "PGPASSWORD", "TEST_DATABASE_URL", "UVICORN_PORT",
              "PROMETHEUS_MULTIPROC_DIR", "KUBERNETES_PORT", "KUBERNETES_SERVICE_HOST", "LANG", "DATABASE_USER",
              "LOG_FORMATTER", "APP_ENV"]  # fmt: skip
    environ = {**dict.fromkeys(others, "1"), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}  # a directory it may write
    assert load_settings(environ).unknown_variables == ()
    assert load_settings({**PRODUCTION, "LOG_LEVEL": "debug"}).unknown_variables == ()


def test_start_up_warns_of_each_misspelt_variable(caplog: pytest.LogCaptureFixture) -> None:
    """The service starts on the defaults, and says once per variable what it ignored and what was meant."""
    create_app(load_settings({"DATABSE_URL": "postgresql://u:Pw-Secret-99@db/app"}))
    warnings = [r.getMessage() for r in caplog.records if r.name == "service" and "DATABSE_URL" in r.getMessage()]
    assert warnings == ["DATABSE_URL is set but is not a setting, so it is ignored: did you mean DATABASE_URL?"]


def test_repr_masks_the_secret_key_and_database_password() -> None:
    """Logging the settings object by mistake leaks nothing."""
    text = repr(load_settings({**PRODUCTION, "DATABASE_URL": "postgresql://u:Pw-Secret-99@db/app"}))
    assert GOOD_KEY not in text
    assert "Pw-Secret-99" not in text
    assert "database_url='postgresql://u:***@db/app'" in text


def test_env_example_is_valid_and_names_every_variable() -> None:
    """`.env.example` loads as it is and mentions every variable of the contract."""
    path = Path(__file__).resolve().parent.parent / ".env.example"
    values = {k: v for k, v in dotenv_values(path).items() if v is not None}
    assert load_settings(values).database_url is not None
    text = path.read_text()
    for name in VARIABLES:
        assert name in text


def _safe() -> dict[str, str]:
    return {"SECRET_KEY": GOOD_KEY, "DATABASE_URL": "postgresql://u:pw-123456@db/app"}
