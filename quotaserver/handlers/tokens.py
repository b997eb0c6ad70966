"""Admin API for API tokens: list, create, revoke (admin only; audited).

A new token is returned once, in the creation response, and never again: only its
SHA-256 digest is stored. Revoking closes the live connections of the token and of the
browser sessions made from it with 1008, once the revocation has committed. If the
database refuses a change the answer is 503 and nothing has changed.
"""

from __future__ import annotations

from ..auth import AuthError
from .base import ApiError, BaseHandler

CREATE_FIELDS = {"name", "role"}


def api_error(exc: AuthError) -> ApiError:
    headers = {"Retry-After": "5"} if exc.status == 503 else None
    return ApiError(exc.status, exc.code, exc.message, headers)


class TokensHandler(BaseHandler):
    """GET /api/admin/tokens lists tokens; POST {"name", "role"} creates one."""

    async def get(self) -> None:
        self.send_json({"tokens": await self.app.auth.token_list()})

    async def post(self) -> None:
        body = self.json_body()
        unknown = set(body) - CREATE_FIELDS
        if unknown:
            raise ApiError(400, "unknown_field", f"unknown field {sorted(unknown)[0]!r}")
        try:
            token, info = await self.app.auth.create_token(
                body.get("name"), body.get("role"), self.actor
            )
        except AuthError as exc:
            raise api_error(exc) from None
        self.send_json({"token": token, **info.to_json()}, status=201)


class TokenHandler(BaseHandler):
    """DELETE /api/admin/tokens/{token_id}: revoke, and end its live connections."""

    async def delete(self, token_id: str) -> None:
        try:
            info = await self.app.auth.revoke_token(token_id, self.actor)
        except AuthError as exc:
            raise api_error(exc) from None
        closed = self.app.end_identity(token_ids=[info.token_id])
        self.send_json(
            {"revoked": info.to_json() | {"revoked": True}, "connections_closed": closed}
        )
