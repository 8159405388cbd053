"""Who owns a request: the logged-in user, or an anonymous browser identified by a random token.

Without auth each browser gets a random token kept in `gr.BrowserState`, encrypted with a secret pinned in the
data directory (so it survives server restarts); the owner id is a hash of the token, so the database never
holds the token itself. API clients without auth are owners for the length of their client session.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

_TOKEN = re.compile(r"[0-9a-f]{64}")


class AuthFileError(ValueError):
    """An --auth value or --auth-file line that is not `user:password`."""


def new_token() -> str:
    """A fresh random browser token, in the form `browser_owner` accepts."""
    return secrets.token_hex(32)


def browser_owner(token: str) -> str | None:
    """The owner id for a browser token, or None when the token is not one we issued."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        return None
    return "anon-" + hashlib.sha256(token.encode()).hexdigest()[:32]


def session_owner(session_hash: str) -> str:
    """Owner id of an API client without auth: one per Gradio session, hashed like browser tokens."""
    return "session-" + hashlib.sha256(session_hash.encode()).hexdigest()[:32]


def pinned_secret(data_dir: Path) -> str:
    """`$TAPCHAT_SECRET`, else a secret created once in the data directory (readable by this user only)."""
    if env := os.environ.get("TAPCHAT_SECRET"):
        return env
    path = data_dir / "browser-secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return secret


def parse_credentials(values: list[str], files: list[Path]) -> list[tuple[str, str]]:
    """`user:password` pairs from --auth values and --auth-file lines (blank lines and # comments skipped)."""
    lines = [(v, "--auth") for v in values]
    for path in files:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise AuthFileError(f"cannot read auth file {path}: {exc.strerror}") from None
        lines += [(line.strip(), f"{path}:{i}") for i, line in enumerate(text.splitlines(), 1)
                  if line.strip() and not line.lstrip().startswith("#")]
    pairs = []
    for line, where in lines:
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise AuthFileError(f"{where}: expected user:password")
        pairs.append((user.strip(), password))
    return pairs
