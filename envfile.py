"""The `.env` file: the variables it sets under the process environment's, and what is wrong with it.

python-dotenv's parser reads it, with the service's rules where python-dotenv's own reading would
start a misconfigured service without a word (`_dotenv_values`). `settings.load_settings` lists
the file's problems with the variables' own: `load_settings(*read_environment())`.
"""

from __future__ import annotations

import io
import os
import re
from collections import ChainMap
from pathlib import Path

from dotenv.parser import parse_stream
from dotenv.variables import Variable, parse_variables

from settings import VARIABLES

_ENV_NAME = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=")
_SINGLE_QUOTED = re.compile(r"\s*(?:export\s+)?[^=]*=\s*'")  # a `.env` line whose value is in single quotes


def read_environment(env_file: str | Path = ".env") -> tuple[dict[str, str], list[str]]:
    """The process environment over the `.env` file (real variables always win), and what is wrong
    with the file: `load_settings(*read_environment())` lists those problems with the variables' own.

    `PYTHON_DOTENV_DISABLED=1`, python-dotenv's own switch, leaves the file out (the tests set it).
    """
    disabled = os.environ.get("PYTHON_DOTENV_DISABLED", "").casefold() in ("1", "true", "t", "yes", "y")
    path = Path(env_file)
    values: dict[str, str] = {}
    problems = []
    if not disabled and path.is_symlink() and not path.exists():  # a secret's mount that is not there
        problems.append(f"{env_file}: is a link to {os.readlink(path)}, which does not exist")
    if not disabled and path.exists() and not path.is_dir():  # a file, or a pipe a secrets manager mounts
        try:
            text = path.read_text(encoding="utf-8-sig")  # python-dotenv's reading, a BOM aside
        except (OSError, UnicodeDecodeError) as exc:  # unreadable, or not UTF-8: a mistake, not a crash
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            problems.append(f"{env_file}: cannot be read ({reason})")
            text = ""
        values = _dotenv_values(env_file, text, problems)
        if "PROMETHEUS_MULTIPROC_DIR" in values and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            # prometheus-client reads it from the process environment, as it is imported: never from here
            problems.append(f"{env_file}: sets PROMETHEUS_MULTIPROC_DIR, which prometheus-client "
                            "reads from the server's environment alone: set it there")  # fmt: skip
    values.update(os.environ)
    return values, problems


def _dotenv_values(env_file: str | Path, text: str, problems: list[str]) -> dict[str, str]:
    """The variables a `.env` file's text sets, read by python-dotenv's parser; its problems go to `problems`.

    Not `dotenv_values`, for three of its ways: it skips a line it cannot parse with a warning,
    and start-up would go on without it (an unclosed quote on `ENVIRONMENT="production` would
    start a development server); in `${NAME}` it prefers the file's NAME to the environment's,
    where the environment always wins here; and it expands `${NAME}` inside single quotes too,
    which shells and Compose keep as written (a password holding `${`). Here a single-quoted
    value is taken as written, and in a setting the service reads from the file, a `${NAME}` set
    neither in the environment nor above it, without a `:-default`, is a problem rather than
    silently empty (another tool's variable in a shared file is left as python-dotenv reads it).
    """
    values: dict[str, str] = {}
    empty: dict[str, str] = {}  # a setting's `${NAME}` set nowhere: its problem, unless a later line sets it again
    for binding in parse_stream(io.StringIO(text)):
        line, key, value = binding.original, binding.key, binding.value
        if binding.error:
            problems.append(_unparsed(env_file, line.line, line.string))
            continue
        if key is None:  # a comment or a blank line
            continue
        empty.pop(key, None)
        if value is None:  # a name alone: unset, as python-dotenv has it
            values.pop(key, None)
            continue
        if _SINGLE_QUOTED.match(line.string):
            values[key] = value
            continue
        known = ChainMap(os.environ, values)  # the environment first, then the lines above
        atoms = list(parse_variables(value))
        unset = [a.name for a in atoms if isinstance(a, Variable) and a.default is None and a.name not in known]
        if unset and key in VARIABLES and key not in os.environ:  # a line the service reads
            empty[key] = (
                f"{env_file}, line {line.line} ({key}): ${{{unset[0]}}} is set neither in the environment nor "
                "above it in the file, and would read as empty: set it, or single-quote the value to keep it as written"
            )
        values[key] = "".join(atom.resolve(known) for atom in atoms)
    problems += empty.values()
    return values


def _unparsed(env_file: str | Path, number: int, text: str) -> str:
    """A `.env` line python-dotenv cannot parse, named by its variable, never its value (it may be a secret)."""
    name = _ENV_NAME.match(text)
    where = f"{env_file}, line {number}" + (f" ({name[1]})" if name else "")
    return f"{where}: cannot be parsed as NAME=value (an unclosed quote?)"
