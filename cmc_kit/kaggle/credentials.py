"""Kaggle credentials: where they are, the help when they are not, Kaggle Secrets, and keeping
them out of every message.

The kaggle package and kagglehub each look for credentials themselves; this module only names the
first source they would find (never its value), so that a failure can say what was tried. Like
`config`, it reads environment variables.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
import warnings
from pathlib import Path
from typing import Any

from cmc_kit.errors import ConfigError, CredentialsError, DataError

# The names a notebook's secrets (Add-ons -> Secrets) may carry, in the order they are tried.
SECRET_NAMES = ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY")
_TOKEN_FILES = ("access_token", "access_token.txt", "credentials.json")  # new-style / OAuth
_MIN_SECRET_LENGTH = 8  # shorter values (a username) are not worth hiding and hide too much


def kaggle_config_dir() -> Path:
    """Where the kaggle package looks for kaggle.json (same rule as kaggle 1.6+/2.x)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"]).expanduser()
    legacy = Path.home() / ".kaggle"
    if sys.platform.startswith("linux") and not legacy.exists():
        return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"
    return legacy


def _read_kaggle_json(*, warn: bool = True) -> dict[str, Any]:
    config_file = kaggle_config_dir() / "kaggle.json"
    if not config_file.is_file():
        return {}
    if warn and os.name != "nt" and config_file.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.warn(f"{config_file} is readable by other users; protect your Kaggle key with "
                      f"`chmod 600 {config_file}`.", stacklevel=4)
    try:
        content = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def credentials_problem() -> str | None:
    """What is wrong with credentials that are there but cannot work (never their values): a
    kaggle.json that is not JSON or lacks username/key, a KAGGLE_API_TOKEN with spaces or quotes
    in it (a copy-paste slip), or one of KAGGLE_USERNAME / KAGGLE_KEY without the other."""
    config_file = kaggle_config_dir() / "kaggle.json"
    if config_file.is_file():
        try:
            content = json.loads(config_file.read_text())
        except UnicodeDecodeError:
            return (f"{config_file} is not a text file; download a new one from kaggle.com -> "
                    "Settings -> API -> Create New Token")
        except ValueError as err:
            return (f"{config_file} is not valid JSON ({err.msg}, line {err.lineno}); download a "
                    "new one from kaggle.com -> Settings -> API -> Create New Token")
        except OSError as err:
            return f"{config_file} cannot be read ({err.strerror}); check its permissions"
        if not isinstance(content, dict) or not content.get("username") or not content.get("key"):
            return (f"{config_file} has no \"username\" and \"key\" entries; download a new one "
                    "from kaggle.com -> Settings -> API -> Create New Token")
    token = os.environ.get("KAGGLE_API_TOKEN")
    if token is not None and (not token.strip() or any(c in token for c in " \t\n'\"{}")):
        return ("KAGGLE_API_TOKEN is set but is not a Kaggle token (it is empty or holds spaces, "
                "quotes or braces: paste the token alone, as kaggle.com -> Settings -> API "
                "shows it)")
    if bool(os.environ.get("KAGGLE_USERNAME")) != bool(os.environ.get("KAGGLE_KEY")):
        missing = "KAGGLE_KEY" if os.environ.get("KAGGLE_USERNAME") else "KAGGLE_USERNAME"
        return f"{missing} is not set while its partner is"
    return None


def find_credentials() -> str | None:
    """Names the first credential source the kaggle package would use, or None. Never the key."""
    from_file = _read_kaggle_json()
    username = os.environ.get("KAGGLE_USERNAME") or from_file.get("username")
    key = os.environ.get("KAGGLE_KEY") or from_file.get("key")
    if username and key:
        return str(kaggle_config_dir() / "kaggle.json") if from_file.get("key") \
            else "KAGGLE_USERNAME/KAGGLE_KEY"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_API_V1_TOKEN") and Path(os.environ["KAGGLE_API_V1_TOKEN"]).is_file():
        return "KAGGLE_API_V1_TOKEN"
    for name in _TOKEN_FILES:
        if (Path.home() / ".kaggle" / name).is_file():
            return str(Path.home() / ".kaggle" / name)
    return None


def kaggle_username(given: str | None = None) -> str | None:
    """The Kaggle user name: `given`, else KAGGLE_USERNAME, else kaggle.json's "username"."""
    return given or os.environ.get("KAGGLE_USERNAME") or _read_kaggle_json(warn=False).get("username")


def require_username(given: str | None = None) -> str:
    """`kaggle_username(given)`, or a ConfigError saying how to give it."""
    user = kaggle_username(given)
    if not user:
        raise ConfigError("No Kaggle user name (the owner in the dataset and kernel ids): pass "
                          "--user NAME (your kaggle.com user name), or set KAGGLE_USERNAME.")
    return user


def credentials_help() -> str:
    config_file = kaggle_config_dir() / "kaggle.json"
    problem = credentials_problem()
    # Credentials that are there but broken are named as such, not as "not found".
    found = (f"Kaggle credentials cannot be used: {problem}." if problem
             else "Kaggle credentials not found.")
    return (
        f"{found} Get a token on kaggle.com -> Settings -> API -> "
        "'Create New Token', then provide it in one of these ways and run the command again:\n"
        "  1. a new-style API token in the environment variable KAGGLE_API_TOKEN "
        "(or saved as ~/.kaggle/access_token);\n"
        "  2. environment variables KAGGLE_USERNAME and KAGGLE_KEY;\n"
        f"  3. the downloaded kaggle.json saved as {config_file} with mode 600 "
        f"(`chmod 600 {config_file}`); set KAGGLE_CONFIG_DIR to keep it in another folder;\n"
        "  4. in a Kaggle notebook: Add-ons -> Secrets, add KAGGLE_API_TOKEN (or KAGGLE_USERNAME "
        "and KAGGLE_KEY) and tick it for this notebook; cmc_kit reads them itself "
        "(or simply attach the dataset with 'Add Input': no credentials needed)."
    )


def load_kaggle_secrets(client: Any = None) -> list[str]:
    """Copies this Kaggle notebook's secrets KAGGLE_API_TOKEN / KAGGLE_USERNAME / KAGGLE_KEY into
    the environment, where kagglehub and the kaggle package look. Returns the names it set.

    `client` is a `kaggle_secrets.UserSecretsClient`-like object (`get_secret(name) -> str`);
    default: Kaggle's own, when importable. A secret that is not there (or not ticked for this
    notebook) is skipped; a variable already set is left alone. Values are never printed.
    """
    if client is None:
        try:
            from kaggle_secrets import UserSecretsClient  # only inside Kaggle notebooks
        except ImportError:
            return []
        client = UserSecretsClient()
    loaded = []
    for name in SECRET_NAMES:
        if os.environ.get(name):
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                value = client.get_secret(name)
        except Exception:  # not added, not attached to this notebook, no Internet
            continue
        if value:
            os.environ[name] = str(value)
            loaded.append(name)
    return loaded


def secret_values() -> list[str]:
    """Every Kaggle key or token this machine holds (environment, kaggle.json, token files),
    longest first: what `redact` takes out."""
    found = [os.environ.get(name) for name in ("KAGGLE_KEY", "KAGGLE_API_TOKEN")]
    found.append(str(_read_kaggle_json(warn=False).get("key") or ""))
    for name in _TOKEN_FILES:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            found.append((Path.home() / ".kaggle" / name).read_text().strip())
    return sorted({s for s in found if s and len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every Kaggle key or token (`secret_values()` unless given) replaced by "***",
    for messages that quote another library's output or error."""
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, "***")
    return text


class _RedactingStream:
    """A text stream that forwards to `stream` with keys and tokens taken out."""

    def __init__(self, stream, secrets: list[str]):
        self._stream, self._secrets = stream, secrets

    def write(self, text: str) -> int:
        self._stream.write(redact(text, self._secrets))
        return len(text)

    def __getattr__(self, name):  # flush, isatty, encoding: the real stream's
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_output():
    """While a download client runs: its prints and progress bars shown, with keys taken out."""
    secrets = secret_values()
    with contextlib.redirect_stdout(_RedactingStream(sys.stdout, secrets)), \
            contextlib.redirect_stderr(_RedactingStream(sys.stderr, secrets)):
        yield


def import_kaggle_api() -> Any:
    """Imports the kaggle package lazily; its import authenticates and may exit or raise."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # kaggle prints its own auth help
            from kaggle.api.kaggle_api_extended import KaggleApi
    except (SystemExit, OSError):
        raise CredentialsError(credentials_help()) from None  # kaggle's text can quote config values
    except ImportError as err:
        raise DataError("The `kaggle` package is not installed. Install it with "
                        "`pip install kaggle` (it is a cmc-kit dependency).") from err
    return KaggleApi()


def authenticate(api: Any) -> None:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            api.authenticate()
    except (SystemExit, OSError):
        raise CredentialsError(credentials_help()) from None  # kaggle's text can quote config values
