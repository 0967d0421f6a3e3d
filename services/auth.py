"""Bearer-token authentication for the gRPC ingress, checked inside the deployments.

Serve's gRPC proxy forwards every call it can route and has no authentication (nor TLS) of its
own, so each replica checks the caller's `authorization: Bearer <token>` metadata before doing
any work (`services.status.rpc` calls `check`). The expected token comes from an environment
variable named in the settings, never from the config file, and is compared in constant time.
The source agent attaches the same token to its own calls to the bridge and target apps.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable

from latentwire.errors import LatentWireError
from latentwire.settings import AuthSettings

SCHEME = "bearer"


class Unauthenticated(LatentWireError):
    code = "UNAUTHENTICATED"


class BearerAuth:
    """`check(metadata)` refuses a call without the right token; `metadata()` is what to send."""

    def __init__(self, settings: AuthSettings | dict | None = None, *, environ=None):
        self.settings = s = AuthSettings.model_validate(settings or {})
        env = os.environ if environ is None else environ
        token = env.get(s.token_env, "")
        if s.required and not token:
            raise RuntimeError(f"auth.required is set but the environment variable {s.token_env} is empty; "
                               "refusing to serve without a token")
        if s.required and len(token) < s.min_token_chars:
            raise RuntimeError(f"the token in {s.token_env} has {len(token)} characters; at least "
                               f"{s.min_token_chars} are required (auth.min_token_chars)")
        self.required = s.required
        self._token = token.encode()

    @classmethod
    def of(cls, settings) -> "BearerAuth":
        return cls(getattr(settings, "auth", None))

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        if not self.required:
            return
        values = [v for k, v in metadata or () if k.lower() == "authorization"]
        if not values:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        if len(values) > 1:
            raise Unauthenticated("more than one authorization header")
        value = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
        scheme, _, given = value.strip().partition(" ")
        if scheme.lower() != SCHEME or not given:
            raise Unauthenticated("authorization must use the Bearer scheme")
        # compare_digest takes time independent of where the strings differ; never echo the token
        if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), self._token):
            raise Unauthenticated("invalid bearer token")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata for this service's own calls to the other apps (empty when it has no token)."""
        return (("authorization", f"Bearer {self._token.decode()}"),) if self._token else ()
