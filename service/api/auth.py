"""Bearer API keys with roles reader < editor < admin.

Keys come from settings (``MEND_API_KEYS``); each is compared with :func:`hmac.compare_digest`
against every configured key, and keys are never logged, only the holder's name.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.settings import ROLE_RANK

_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


@dataclass(frozen=True)
class Principal:
    """Who is calling; ``name`` is recorded in the journal as the author."""

    name: str
    role: str


ANONYMOUS = Principal("anonymous", "admin")


def _unauthorized(msg: str) -> HTTPException:
    return HTTPException(status_code=401, detail=msg, headers={"WWW-Authenticate": "Bearer"})


def require(role: str):
    """A dependency that admits callers whose key has at least ``role``."""

    def dependency(request: Request,
                   credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
        keys = request.app.state.runtime.settings.api_keys
        if not keys:
            principal = ANONYMOUS
        else:
            if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
                raise _unauthorized("missing bearer API key")
            presented = credentials.credentials.encode()
            found = None
            for key, info in keys.items():  # no early exit: time does not depend on which key matched
                if hmac.compare_digest(key.encode(), presented):
                    found = info
            if found is None:
                raise _unauthorized("invalid API key")
            principal = Principal(found.name, found.role)
            if ROLE_RANK[found.role] < ROLE_RANK[role]:
                raise HTTPException(status_code=403, detail=f"this route needs role {role!r}; key "
                                                            f"{found.name!r} has role {found.role!r}")
        request.state.principal = principal.name
        return principal

    dependency.__name__ = f"require_{role}"
    return dependency


ReaderPrincipal = Annotated[Principal, Depends(require("reader"))]
EditorPrincipal = Annotated[Principal, Depends(require("editor"))]
AdminPrincipal = Annotated[Principal, Depends(require("admin"))]
