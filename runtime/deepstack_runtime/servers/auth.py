"""The router's API keys (router.apiKeySecret): a file of keys, one per line, mounted from
the Secret and re-read when it changes, so that a rotated key reaches a running router.

It fails closed: a router told to use a key file that is missing, unreadable or blank
does not start; a file that later turns blank or unreadable refuses every request (and
says why in the log) until it holds keys again.
"""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class ApiKeyError(Exception):
    """The key file cannot be used; the message says why."""


def parse_api_keys(text: str) -> frozenset[str]:
    """One key per line (or separated by any whitespace); blank lines ignored."""
    return frozenset(text.split())


def authorized(header: str | None, keys: frozenset[str]) -> bool:
    """Whether an Authorization header carries one of `keys` (compared in constant time)."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    offered = token.strip().encode()
    # Every key is compared, so that the time taken says nothing about which matched.
    return sum(hmac.compare_digest(offered, key.encode()) for key in keys) > 0


def read_keys(path: str) -> frozenset[str]:
    try:
        with open(path, encoding="utf-8") as f:
            keys = parse_api_keys(f.read())
    except (OSError, UnicodeDecodeError) as e:
        raise ApiKeyError(f"cannot read the API key file {path}: {e}") from e
    if not keys:
        raise ApiKeyError(f"the API key file {path} holds no key")
    return keys


@dataclass
class ApiKeys:
    """The keys a client must send, from `path` ("": no authentication)."""

    path: str = ""
    keys: frozenset[str] = frozenset()
    problem: str = ""  # why every request is refused now, if it is
    _seen: tuple[int, int, int] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str) -> ApiKeys:
        """The keys of `path`; ApiKeyError if there are none to use (the router must not
        start then: serving without the keys it was told to require would be open)."""
        if not path:
            return cls()
        keys = cls(path)
        keys.keys = read_keys(path)
        keys._seen = keys._stamp()
        return keys

    @property
    def required(self) -> bool:
        return bool(self.path)

    def allows(self, header: str | None) -> bool:
        if not self.required:
            return True
        return not self.problem and authorized(header, self.keys)

    def refresh(self) -> None:
        """Re-read the file if it changed (a Secret volume swaps in a new file)."""
        if not self.required:
            return
        stamp = self._stamp()
        if stamp == self._seen and not self.problem:
            return
        self._seen = stamp
        try:
            keys = read_keys(self.path)
        except ApiKeyError as e:
            if str(e) != self.problem:
                log.error("%s: every request is refused until it holds keys", e)
            self.problem = str(e)
            return
        if keys != self.keys or self.problem:
            log.info("API keys reloaded from %s: %d keys", self.path, len(keys))
        self.keys, self.problem = keys, ""

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows the Secret volume's symlinks
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size
