"""TLS: server-side ``ssl.SSLContext`` creation and client-certificate names.

One function builds the context for every TLS listener (the ``amqps``
listener now, the management HTTP server later), so all of them share the
same rules: a minimum protocol version of TLS 1.2 unless told 1.3, and
client certificates either required and verified against a CA bundle
(``verify_peer``) or not requested at all.
"""

from __future__ import annotations

import ssl
from typing import Any

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSError(Exception):
    """A TLS setting cannot be used; the message is fit for a user."""


def server_context(
    cert: str,
    key: str = "",
    ca: str = "",
    verify_peer: bool = False,
    min_version: str = "1.2",
) -> ssl.SSLContext:
    """A server context for the PEM certificate chain ``cert`` and its
    private ``key`` (empty: the key is in ``cert``). With ``verify_peer``
    every client must present a certificate signed by a CA in ``ca``;
    without it, client certificates are not requested."""
    if min_version not in MIN_VERSIONS:
        raise TLSError(f"unsupported minimum TLS version {min_version!r} (use 1.2 or 1.3)")
    # ssl reports a missing file without its name: check readability first.
    for what, path in (("certificate", cert), ("key", key), ("CA file", ca)):
        if path:
            try:
                open(path, "rb").close()
            except OSError as exc:
                raise TLSError(f"cannot read TLS {what} {path}: {exc.strerror}") from exc
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSIONS[min_version]

    def no_passphrase() -> str:
        # Without this callback OpenSSL would prompt on the terminal.
        raise TLSError(f"TLS key {key or cert} is encrypted; roost needs an unencrypted key")

    try:
        ctx.load_cert_chain(cert, key or None, password=no_passphrase)
    except OSError as exc:
        # ssl.SSLError (a subclass of OSError) for a file that is not PEM
        # or a key that does not belong to the certificate.
        where = f"{cert} and {key}" if key else cert
        raise TLSError(f"cannot load TLS certificate and key from {where}: {_reason(exc)}") from exc
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except OSError as exc:
            raise TLSError(f"cannot load TLS CA file {ca}: {_reason(exc)}") from exc
    if verify_peer:
        if not ca:
            raise TLSError("verifying client certificates needs a CA file (tls_ca)")
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, ssl.SSLError):
        # OpenSSL's bare "[SSL] PEM lib (_ssl.c:NNNN)": the file holds no PEM data.
        return "not a PEM certificate or key"
    return str(exc.strerror or exc)


def peer_common_name(transport: Any) -> str | None:
    """The subject CN of the verified client certificate on ``transport``,
    or None when the connection is not TLS or carries no client certificate.
    (A certificate without a CN gives "".)

    A subject with several CNs gives all of them joined with ",", in the
    certificate's order, as RabbitMQ's ``rabbit_ssl:peer_cert_auth_name``
    does for ``ssl_cert_login_from = common_name``: taking only the first
    would let a certificate issued for "alice,mallory" log in as alice."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    names = [
        str(value) for rdn in cert.get("subject", ()) for attr, value in rdn if attr == "commonName"
    ]
    return ",".join(names)
