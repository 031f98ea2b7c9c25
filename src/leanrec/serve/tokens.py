"""Signed request tokens: what a client presents with every call after ``/v1/rank``.

The token carries the request's id, user, rank time and list length, signed with HMAC-SHA256, so the
service needs no per-request state to check a pagination signal or an event batch, and a client cannot
forge a request, claim another user's request or stretch the list it was shown. Keys rotate: a signer
signs with its current key and accepts tokens signed with the previous one too, so the tokens handed
out before a rotation stay good until their window closes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from leanrec.events.model import RequestRef


class TokenError(ValueError):
    """A token that is malformed, forged or expired, with the reason."""


class TokenExpired(TokenError):
    """A genuine token for the request, presented after its window closed (the service answers 410)."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Signs and checks request tokens.

    Args:
        secret: HMAC key; every process serving or checking one request must share it.
        valid_ms: How long after the ranking a token is accepted.
        previous: The key before ``secret`` (a rotation): tokens it signed are accepted, none is
            signed with it.

    """

    def __init__(self, secret: bytes, valid_ms: int, previous: bytes | None = None) -> None:
        if len(secret) < 16 or (previous is not None and len(previous) < 16):
            raise ValueError("the token secret must be at least 16 bytes")
        self._secret, self.valid_ms = secret, valid_ms
        self._keys = (secret,) if previous is None else (secret, previous)

    @staticmethod
    def _mac(key: bytes, payload: bytes) -> str:
        return _b64(hmac.new(key, payload, hashlib.sha256).digest()[:18])

    def sign(self, ref: RequestRef) -> str:
        """A token for ``ref``, signed with the current key."""
        payload = f"{ref.request_id}|{ref.user_id}|{ref.ts_ms}|{ref.n_items}".encode()
        return f"{_b64(payload)}.{self._mac(self._secret, payload)}"

    def check(self, token: str, request_id: str, now_ms: int) -> RequestRef:
        """The request a token stands for.

        Raises:
            TokenError: Malformed, signed with neither key, or for another request.
            TokenExpired: Genuine, but past its window.

        """
        try:
            body, mac = token.split(".")
            payload = _unb64(body)
        except (ValueError, TypeError):
            raise TokenError("malformed token") from None
        # Compared as bytes: compare_digest refuses str with characters beyond ASCII, and a client may send
        # any. The current key first: the previous one costs a second MAC only for tokens from before.
        given = mac.encode("utf-8", "surrogatepass")  # JSON may carry a lone surrogate, too
        if not any(hmac.compare_digest(given, self._mac(key, payload).encode()) for key in self._keys):
            raise TokenError("token signature does not match: forged or from another deployment")
        try:
            rid, user, ts, n = payload.decode().split("|")
            ref = RequestRef(rid, int(user), int(ts), int(n))
        except (ValueError, UnicodeDecodeError):
            raise TokenError("malformed token payload") from None
        if ref.request_id != request_id:
            raise TokenError(f"token is for request {ref.request_id}, not {request_id}")
        if now_ms > ref.ts_ms + self.valid_ms:
            raise TokenExpired(f"token expired {now_ms - ref.ts_ms - self.valid_ms} ms ago")
        return ref
