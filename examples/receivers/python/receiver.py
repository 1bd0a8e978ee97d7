"""An sfox-relay receiver in an existing FastAPI service: copy what you need.

It verifies the Standard Webhooks signature (without a timestamp tolerance, so that a backlog
delivered after an outage still verifies), deduplicates on ``webhook-id`` (the relay delivers
at least once), decrypts an ``encrypt``-policy user token, and keeps the newest state of each
user by ``sfox-timestamp`` (deliveries of one user arrive in order, but a replayed one
arrives after later ones). Run it with::

    WEBHOOK_SECRET=whsec_... TOKEN_KEY=<base64 of 32 bytes> PORT=8000 python receiver.py

``seen`` and ``users`` are dicts here; in a service they are your database, and the dedupe
check and the state update belong in one transaction.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Any

import uvicorn
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import FastAPI, HTTPException, Request, Response

SECRETS = [
    base64.b64decode(secret.removeprefix("whsec_"))
    for secret in os.environ["WEBHOOK_SECRET"].split()
]
TOKEN_KEY = base64.b64decode(os.environ["TOKEN_KEY"]) if os.environ.get("TOKEN_KEY") else None

app = FastAPI()
seen: set[str] = set()  # webhook-ids already handled
users: dict[str, dict[str, Any]] = {}  # user_id -> newest state


def verified(headers: Any, body: bytes) -> bool:
    """Standard Webhooks: HMAC-SHA256 of ``id.timestamp.body``; any listed v1 signature."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    given = [s.partition(",")[2] for s in headers["webhook-signature"].split()]
    for key in SECRETS:
        digest = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        if any(hmac.compare_digest(digest, signature) for signature in given):
            return True
    return False


def decrypt_token(user_token: dict[str, Any], webhook_id: str) -> str | None:
    """The ``encrypt`` policy: AES-256-GCM, the webhook-id as associated data; the 16-byte
    GCM tag is the end of ``ciphertext``."""
    if TOKEN_KEY is None or user_token.get("alg") != "A256GCM":
        return None
    nonce = base64.b64decode(user_token["nonce"])
    ciphertext = base64.b64decode(user_token["ciphertext"])
    return AESGCM(TOKEN_KEY).decrypt(nonce, ciphertext, webhook_id.encode()).decode()


@app.post("/webhooks/sfox", status_code=204)
async def receive(request: Request) -> Response:
    body = await request.body()
    headers = request.headers
    if not all(h in headers for h in ("webhook-id", "webhook-timestamp", "webhook-signature")):
        raise HTTPException(400, "not a Standard Webhooks request")
    if not verified(headers, body):
        raise HTTPException(401, "bad signature")  # 4xx: the relay will not retry it
    webhook_id = headers["webhook-id"]
    if webhook_id in seen:
        return Response(status_code=204)  # a retry of what we already have
    message = json.loads(body)
    payload = message.get("payload") or {}
    user_id = payload.get("user_id")
    if user_id is not None:
        # The header carries the 19 digits exactly (a JSON number may not survive as one).
        stamp = int(headers.get("sfox-timestamp") or message["timestamp"])
        current = users.get(user_id)
        if current is None or stamp >= current["sfox_timestamp"]:
            token = payload.get("user_token")
            users[user_id] = {
                "status": payload.get("status"),
                "requirements": payload.get("requirements"),
                "sfox_timestamp": stamp,
                "token": decrypt_token(token, webhook_id) if isinstance(token, dict) else None,
            }
    seen.add(webhook_id)
    return Response(status_code=204)


@app.get("/users")
async def newest_states() -> dict[str, Any]:
    """What this receiver holds (for the demo and the test)."""
    return {"deliveries": len(seen), "users": users}


if __name__ == "__main__":
    uvicorn.run(
        app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")), log_level="warning"
    )
