"""Who may use the web views: clients with API tokens, and workers with the peer secret.

A client sends ``Authorization: Bearer <token>``. With tokens configured, the write views
(``POST /v1/tasks``, ``POST /v1/batch``) need one, and the read views too with
``BLACKROAD_API_READS=token``; with none configured, every view is open. A token is
compared by its SHA-256 digest against every configured one, all of them each time
(``hmac.compare_digest``), so the time taken tells nothing of how much of a token was
right or which one matched. A token never reaches the logs: a client is named by
``tok_`` and the first 8 hex digits of its token's digest.

A worker forwarding a request to another (the owner of an agent, or every worker for a
fan-out) sends the peer secret in ``X-Blackroad-Forwarded``. A request carrying that
header with anything else is refused (403): a forwarded request is answered from the
worker's own tables only, is not forwarded again, and has had its client's token checked
by the worker that forwarded it, so an outsider must not be able to pass for a worker.
"""

from __future__ import annotations

import hashlib
import hmac

from streams.runtime.settings import Settings
from streams.serve.rate_limit import TokenBuckets


def client_name(token: str) -> str:
    """How logs and limits name the client holding ``token``."""
    return "tok_" + hashlib.sha256(token.encode()).hexdigest()[:8]


class Refused(Exception):
    """A request the guard does not let in: ``status`` 401 (no or a wrong token) or 403."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ApiGuard:
    def __init__(
        self,
        tokens: list[str],
        reads_need_token: bool,
        peer_secret: str,
        requests: TokenBuckets | None = None,
        tasks: TokenBuckets | None = None,
    ) -> None:
        #: Each client's requests, and tasks posted, a second (no limit when None).
        self.requests = requests or TokenBuckets(0, 0)
        self.tasks = tasks or TokenBuckets(0, 0)
        self._digests = [hashlib.sha256(token.encode()).digest() for token in tokens]
        self._reads_need_token = reads_need_token
        self._peer_secret = peer_secret.encode()
        #: The header value this worker sends with the requests it forwards.
        self.peer_secret = peer_secret

    @property
    def enabled(self) -> bool:
        """True when API tokens are configured."""
        return bool(self._digests)

    def client(self, authorization: str | None, writes: bool) -> str | None:
        """The name of the client making a request (None: anonymous, allowed); raises
        :class:`Refused` when the request needs a token it does not carry."""
        needs_token = self.enabled and (writes or self._reads_need_token)
        if authorization is None:
            if needs_token:
                raise Refused(401, "this view needs an API token: send Authorization: Bearer <token>")
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Refused(401, "the Authorization header must be: Bearer <token>")
        if not self.enabled:
            return None  # tokens are not in use: one sent is not checked
        digest = hashlib.sha256(token.encode()).digest()
        known = False
        for candidate in self._digests:
            known |= hmac.compare_digest(digest, candidate)
        if not known:
            raise Refused(401, "unknown API token")
        return client_name(token)

    def is_peer(self, forwarded: str) -> bool:
        """Whether a request's ``X-Blackroad-Forwarded`` value is the peer secret."""
        return hmac.compare_digest(forwarded.encode(), self._peer_secret)


def guard_for(settings: Settings, peer_secret: str) -> ApiGuard:
    """The guard a worker or reader lets requests in with: the configured tokens and limits."""
    requests, tasks, burst = settings.rate_limit_requests, settings.rate_limit_tasks, settings.rate_limit_burst
    return ApiGuard(
        settings.api_token_list(),
        settings.api_reads == "token",
        peer_secret,
        TokenBuckets(requests, requests * burst),
        TokenBuckets(tasks, tasks * burst),
    )
