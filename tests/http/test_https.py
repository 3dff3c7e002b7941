"""The management API over TLS (http_tls_cert / http_tls_key), with a
certificate made for the test."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from roost.config import ConfigError, load_config
from roost.testing import RoostBroker, RoostProcess


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    d = tmp_path_factory.mktemp("https")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "roost https test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = d / "api.crt", d / "api.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _get(url: str, context: ssl.SSLContext | None) -> tuple[int, object]:
    req = urllib.request.Request(url)
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(req, timeout=5, context=context) as resp:
        return resp.status, json.loads(resp.read())


def test_api_served_over_https(cert: tuple[Path, Path]) -> None:
    cert_path, key_path = cert
    with RoostBroker(http_tls_cert=str(cert_path), http_tls_key=str(key_path)) as broker:
        assert broker.http_url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(cert_path))
        status, data = _get(broker.http_url + "/api/overview", trusted)
        assert status == 200
        assert isinstance(data, dict)
        protocols = {(x["protocol"], x["port"]) for x in data["listeners"]}
        assert ("https", broker.http_port) in protocols
        # A client that does not trust the certificate is refused...
        with pytest.raises(urllib.error.URLError) as info:
            _get(broker.http_url + "/api/overview", ssl.create_default_context())
        assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
        # ...and plain HTTP gets no answer from the TLS port.
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _get(f"http://127.0.0.1:{broker.http_port}/api/overview", None)


def test_process_announces_https(cert: tuple[Path, Path]) -> None:
    cert_path, key_path = cert
    args = ["--http-tls-cert", str(cert_path), "--http-tls-key", str(key_path)]
    with RoostProcess(None, *args) as proc:
        assert proc.http_port
        trusted = ssl.create_default_context(cafile=str(cert_path))
        status, _ = _get(f"https://127.0.0.1:{proc.http_port}/api/whoami", trusted)
        assert status == 200


def test_http_tls_key_needs_cert() -> None:
    with pytest.raises(ConfigError, match="http_tls_key needs http_tls_cert"):
        load_config(None, {}, {"http_tls_key": "k.pem"})


def test_slow_headers_over_https_are_cut_off(cert: tuple[Path, Path]) -> None:
    # The read timeouts hold on the TLS listener too (there the guard
    # closes at once after its 408: TLS has no half-close).
    cert_path, key_path = cert
    with RoostBroker(
        http_tls_cert=str(cert_path), http_tls_key=str(key_path), http_header_timeout=1
    ) as broker:
        trusted = ssl.create_default_context(cafile=str(cert_path))
        raw = socket.create_connection(("127.0.0.1", broker.http_port))
        with trusted.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"GET /api/overview HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            sock.settimeout(10)
            start = time.monotonic()
            got = b""
            try:
                while chunk := sock.recv(4096):
                    got += chunk
            except (ssl.SSLError, ConnectionError):
                pass  # closed without a TLS close_notify
            assert time.monotonic() - start < 10
        assert got.startswith(b"HTTP/1.1 408")
