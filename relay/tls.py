"""TLS per endpoint: which CAs it is verified against, which client certificate it is shown.

An endpoint's ``ca_file`` replaces the default trust (``SSL_CERT_FILE``, else the system's) for
that endpoint alone; ``client_cert`` and ``client_key`` are presented when the endpoint asks
(mutual TLS). The files are checked when the configuration is loaded (the ``check_*``
functions: reasons a person can act on, naming paths, never contents) and read into one
:class:`ssl.SSLContext` per endpoint when its sender is built (:func:`context_for`), for every
TLS scheme the relay speaks. Certificate and host name are always verified: nothing here turns
verification off.
"""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from cryptography.x509 import Certificate

    from relay.config import EndpointConfig

__all__ = [
    "TLS_SCHEMES",
    "check_ca_file",
    "check_client_cert",
    "check_client_key",
    "context",
    "context_for",
]

#: URL schemes whose connections are TLS (HTTP, and the brokers of CONTRACT.md 4b).
TLS_SCHEMES = frozenset({"https", "amqps", "tls", "rediss"})


def context(
    ca_file: str | None = None, client_cert: str | None = None, client_key: str | None = None
) -> ssl.SSLContext:
    """A verifying client context: ``ca_file`` (else ``SSL_CERT_FILE``, else the system's CAs),
    presenting ``client_cert`` when given. Raises OSError or ssl.SSLError for bad files."""
    cafile = ca_file or os.environ.get("SSL_CERT_FILE") or None
    ctx = ssl.create_default_context(cafile=cafile)
    if client_cert is not None:
        ctx.load_cert_chain(client_cert, client_key, password=_no_password)
    return ctx


def context_for(endpoint: EndpointConfig) -> ssl.SSLContext:
    """The context one endpoint's TLS connections use (its files were checked at load)."""
    return context(endpoint.ca_file, endpoint.client_cert, endpoint.client_key)


def _no_password() -> NoReturn:
    """Keeps OpenSSL from prompting on the terminal for an encrypted key (a daemon would hang)."""
    raise ValueError("encrypted private keys are not supported")


def _read(path: str) -> bytes:
    """The file's bytes; ValueError with a reason that names the path, never the contents."""
    if not os.path.exists(path):
        raise ValueError(f"no such file: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"not a file: {path}")
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


def check_ca_file(path: str) -> None:
    """ValueError unless ``path`` is a readable PEM bundle that OpenSSL loads as CAs."""
    # OpenSSL alone would also take DER here; the contract says PEM. Bundles often carry
    # comments in UTF-8 (certifi's does), which OpenSSL skips.
    if b"-----BEGIN CERTIFICATE-----" not in _read(path):
        raise ValueError(f"{path} is not a PEM bundle of CA certificates")
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError:
        raise ValueError(f"{path} is not a PEM bundle of CA certificates") from None


def check_client_cert(path: str) -> None:
    """ValueError unless ``path`` holds a PEM certificate (a chain may follow it)."""
    _client_cert(path)


def check_client_key(path: str, cert_path: str) -> None:
    """ValueError unless ``path`` is an unencrypted PEM private key whose public half is the
    first certificate's in ``cert_path`` (already checked by :func:`check_client_cert`)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted: a daemon has no one to type the passphrase
        raise ValueError(f"{path} is encrypted; give the key unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{path} is not a PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    cert = _client_cert(cert_path)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ValueError(f"{path} does not match the certificate in client_cert")
    try:
        context(client_cert=cert_path, client_key=path)
    except (ssl.SSLError, ValueError):
        raise ValueError(f"OpenSSL cannot use {path} with client_cert") from None


def _client_cert(path: str) -> Certificate:
    from cryptography import x509

    data = _read(path)
    try:
        return x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise ValueError(f"{path} is not a PEM certificate") from None
