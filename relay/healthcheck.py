"""``python -m relay.healthcheck``: the container's HEALTHCHECK, exit 0 when ``/healthz`` is 200.

It reads only ``RELAY_ADMIN_ADDR`` (not the whole configuration, which may be unreadable to
this probe or invalid for other reasons) and asks the admin port on this host: a wildcard
listen address (``0.0.0.0``, ``::``) is probed on loopback. Proxies are bypassed, since an
``HTTP_PROXY`` meant for outbound webhooks must not capture a loopback probe.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

__all__ = ["healthz_url", "main"]

DEFAULT_ADDR = "127.0.0.1:8080"
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "[::]": "::1"}


def healthz_url(environ: Mapping[str, str]) -> str:
    """The ``/healthz`` URL of the admin port that ``RELAY_ADMIN_ADDR`` configures."""
    addr = environ.get("RELAY_ADMIN_ADDR") or DEFAULT_ADDR
    host, _, port = addr.strip().rpartition(":")
    host = _WILDCARDS.get(host, host).strip("[]")
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Probe once; 0 healthy, 1 not (the reason on stderr, one line)."""
    del argv  # no options: the address comes from the environment, like the daemon's
    url = healthz_url(os.environ if environ is None else environ)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=3) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.close()
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
