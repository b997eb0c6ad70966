"""Admin API for API tokens: list, create, revoke (admin only; audited).

A new token is returned once, in the creation response, and never again: only its
SHA-256 digest is stored. Revoking closes the live connections of the token and of the
browser sessions made from it with 1008, once the revocation has committed. If the
database refuses a change the answer is 503 and nothing has changed.
"""

from __future__ import annotations

from .base import BaseHandler

CREATE_FIELDS = {"name", "role"}


class TokensHandler(BaseHandler):
    """GET /api/admin/tokens lists tokens; POST {"name", "role"} creates one."""

    async def get(self) -> None:
        self.send_json({"tokens": await self.app.auth.token_list()})

    async def post(self) -> None:
        body = self.json_body(CREATE_FIELDS)
        # Refusals are AuthError (a domain error with its status): rendered by write_error.
        token, info = await self.app.auth.create_token(
            body.get("name"), body.get("role"), self.actor, self.identity
        )
        self.send_json({"token": token, **info.to_json()}, status=201)


class TokenHandler(BaseHandler):
    """DELETE /api/admin/tokens/{token_id}: revoke, and end its live connections."""

    async def delete(self, token_id: str) -> None:
        info = await self.app.auth.revoke_token(token_id, self.actor, self.identity)
        closed = self.app.end_identity(token_ids=[info.token_id])
        self.send_json(
            {"revoked": info.to_json() | {"revoked": True}, "connections_closed": closed}
        )
