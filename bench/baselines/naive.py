"""The naive relay: the sFOX docs' Python example plus one awaited httpx POST per message.

What a user writes in an afternoon, kept that way on purpose: the docs' connect, authenticate,
subscribe and ``async for msg in ws``, with ``print(msg)`` replaced by a POST of the message
to the webhook URL, in order, one at a time. No store, no signing, no retries, no reconnect:
when the connection drops, ``async for`` raises and the script ends.

    ENTERPRISE_API_KEY=... python -m bench.baselines.naive ws://127.0.0.1:8765/ws http://127.0.0.1:8099/
"""

import argparse
import asyncio
import json
import os

import httpx
import websockets


async def main(uri: str, webhook_url: str) -> None:
    async with httpx.AsyncClient() as client, websockets.connect(uri) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "authenticate",
                    "apiKey": f"{os.environ['ENTERPRISE_API_KEY']}",
                    "enterprise": "true",
                }
            )
        )
        # After successful authentication message, subscribe to the users feed
        await ws.send(json.dumps({"type": "subscribe", "feeds": ["private.enterprise.users"]}))
        async for msg in ws:
            if json.loads(msg).get("recipient") == "private.enterprise.users":  # skip replies
                await client.post(
                    webhook_url, content=msg, headers={"content-type": "application/json"}
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("uri", help="the feed, e.g. wss://ws.sfox.com/ws")
    parser.add_argument("webhook_url")
    args = parser.parse_args()
    asyncio.run(main(args.uri, args.webhook_url))
