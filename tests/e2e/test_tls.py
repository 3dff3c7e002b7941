"""AMQP over TLS (amqps) and SASL EXTERNAL.

Certificates are made here with ``cryptography``: one CA that signs the
server certificate (SAN 127.0.0.1 and localhost) and the client
certificates, and a second, unrelated CA whose client certificate roost
must refuse when it verifies peers.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pika
import pika.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pamqp import commands as C

from roost.amqp.wire import PROTOCOL_HEADER
from roost.config import ConfigError, load_config
from roost.testing import RoostBroker, RoostProcess
from roost.tls import TLSError, server_context
from tests.conftest import RawClient

# -- certificates ---------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str | tuple[str, ...] | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "roost tests")]
    for one in (cn,) if isinstance(cn, str) else cn or ():
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, one))
    return x509.Name(attrs)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    other_key: Path  # a key that does not belong to server_cert
    clients: dict[str, tuple[Path, Path]]  # name -> (cert, key)


def _issue(
    directory: Path,
    label: str,
    cn: str | tuple[str, ...] | None,
    ca_name: x509.Name,
    ca_key: ec.EllipticCurvePrivateKey,
    san: list[x509.GeneralName] | None = None,
) -> tuple[Path, Path]:
    key = _key()
    cert = _cert(_name(cn), key, ca_name, ca_key, san=san)
    cert_path, key_path = directory / f"{label}.crt", directory / f"{label}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_name = _key(), _name("roost test CA")
    ca_path = d / "ca.crt"
    ca_path.write_bytes(
        _cert(ca_name, ca_key, ca_name, ca_key, ca=True).public_bytes(serialization.Encoding.PEM)
    )
    server_cert, server_key = _issue(
        d,
        "server",
        "localhost",
        ca_name,
        ca_key,
        san=[
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
    )
    other_key = d / "other.key"
    _write_key(other_key, _key())
    clients = {
        "guest": _issue(d, "client-guest", "guest", ca_name, ca_key),
        "alice": _issue(d, "client-alice", "alice", ca_name, ca_key),
        "nobody": _issue(d, "client-nobody", "nobody", ca_name, ca_key),
        "no-cn": _issue(d, "client-no-cn", None, ca_name, ca_key),
        "two-cn": _issue(d, "client-two-cn", ("alice", "mallory"), ca_name, ca_key),
    }
    rogue_key, rogue_name = _key(), _name("rogue CA")
    clients["rogue"] = _issue(d, "client-rogue", "guest", rogue_name, rogue_key)
    return Pki(ca_path, server_cert, server_key, other_key, clients)


def client_context(pki: Pki, client: str | None = None) -> ssl.SSLContext:
    """A client context trusting the test CA, with ``client``'s certificate."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        cert, key = pki.clients[client]
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


# -- brokers ---------------------------------------------------------------


@pytest.fixture
def tls_broker(pki: Pki) -> Iterator[RoostBroker]:
    """amqps without client-certificate verification."""
    with RoostBroker(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)) as broker:
        yield broker


@pytest.fixture
def mtls_broker(pki: Pki) -> Iterator[RoostBroker]:
    """amqps requiring client certificates signed by the test CA; has a user
    ``alice`` besides guest."""
    with RoostBroker(
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_ca=str(pki.ca),
        tls_verify_peer=True,
    ) as broker:
        assert broker.server is not None
        model = broker.server.broker

        def add_alice() -> None:
            model.users.add("alice", "alice-secret")
            model.permissions[("alice", "/")] = (".*", ".*", ".*")

        broker.call(add_alice)
        yield broker


class TLSRawClient(RawClient):
    """RawClient over TLS."""

    def __init__(self, port: int, ctx: ssl.SSLContext, timeout: float = 5.0) -> None:
        plain = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(plain, server_hostname="localhost")
        self.buf = b""

    def start(self) -> C.Connection.Start:
        self.send(PROTOCOL_HEADER)
        start = self.expect(C.Connection.Start)
        assert isinstance(start, C.Connection.Start)
        return start

    def start_ok(self, mechanism: str, response: str = "") -> object:
        """Answer connection.start; returns the broker's next frame."""
        self.send_frame(
            C.Connection.StartOk(
                client_properties={"capabilities": {"authentication_failure_close": True}},
                mechanism=mechanism,
                response=response,
            )
        )
        return self.recv_frame()[1]


def pika_params(port: int, ctx: ssl.SSLContext, **kwargs: Any) -> pika.ConnectionParameters:
    kwargs.setdefault("credentials", pika.PlainCredentials("guest", "guest"))
    return pika.ConnectionParameters(
        host="127.0.0.1",
        port=port,
        ssl_options=pika.SSLOptions(ctx, server_hostname="localhost"),
        connection_attempts=1,
        blocked_connection_timeout=5,
        socket_timeout=5,
        **kwargs,
    )


def connection_users(broker: RoostBroker) -> list[str]:
    assert broker.server is not None
    server = broker.server
    return broker.call(lambda: sorted(c.username for c in server.connections))


def pika_round_trip(conn: pika.BlockingConnection, queue: str) -> bytes:
    ch = conn.channel()
    ch.queue_declare(queue)
    ch.confirm_delivery()
    ch.basic_publish("", queue, b"over tls " + queue.encode())
    method, _, body = ch.basic_get(queue, auto_ack=True)
    assert method is not None
    return bytes(body)


# -- plain TLS ---------------------------------------------------------------


def test_pika_publish_and_get_over_tls(tls_broker: RoostBroker, pki: Pki) -> None:
    assert tls_broker.tls_port not in (0, tls_broker.port)
    assert tls_broker.tls_url == f"amqps://guest:guest@127.0.0.1:{tls_broker.tls_port}/"
    conn = pika.BlockingConnection(pika_params(tls_broker.tls_port, client_context(pki)))
    try:
        assert pika_round_trip(conn, "tls-q") == b"over tls tls-q"
        # The plain listener keeps working beside the TLS one and sees the
        # same broker.
        plain = pika.BlockingConnection(pika.URLParameters(tls_broker.url))
        try:
            plain.channel().queue_declare("tls-q", passive=True)
        finally:
            plain.close()
    finally:
        conn.close()


async def test_aio_pika_consume_over_amqps_url(tls_broker: RoostBroker, pki: Pki) -> None:
    url = tls_broker.tls_url.replace("127.0.0.1", "localhost")
    conn = await aio_pika.connect(url, ssl_context=client_context(pki))
    try:
        ch = await conn.channel()
        queue = await ch.declare_queue("aio-tls", auto_delete=True)
        for i in range(3):
            await ch.default_exchange.publish(aio_pika.Message(f"m{i}".encode()), "aio-tls")
        got: list[bytes] = []
        async with queue.iterator() as it:
            async for message in it:
                async with message.process():
                    got.append(message.body)
                if len(got) == 3:
                    break
        assert got == [b"m0", b"m1", b"m2"]
    finally:
        await conn.close()


def test_tls_listener_does_not_speak_plain_amqp(tls_broker: RoostBroker) -> None:
    client = RawClient(tls_broker.tls_port)
    try:
        client.send(PROTOCOL_HEADER)
        # The bytes are not a TLS ClientHello: the handshake fails and the
        # broker hangs up without ever sending connection.start.
        client.sock.settimeout(5)
        data = b""
        try:
            while chunk := client.sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        assert not data.startswith(b"\x01\x00\x00")  # no method frame on channel 0
    finally:
        client.close()


def test_client_certificate_not_requested_without_verify_peer(
    tls_broker: RoostBroker, pki: Pki
) -> None:
    # A client offering a certificate anyway still connects, and EXTERNAL
    # is not offered because the broker never asked for the certificate.
    client = TLSRawClient(tls_broker.tls_port, client_context(pki, "alice"))
    try:
        start = client.start()
        assert start.mechanisms == "PLAIN AMQPLAIN"
        assert isinstance(client.start_ok("PLAIN", "\0guest\0guest"), C.Connection.Tune)
    finally:
        client.close()


def test_external_refused_where_not_offered(tls_broker: RoostBroker, pki: Pki) -> None:
    client = TLSRawClient(tls_broker.tls_port, client_context(pki, "alice"))
    try:
        client.start()
        close = client.start_ok("EXTERNAL")
        assert isinstance(close, C.Connection.Close)
        assert close.reply_code == 503
        assert close.reply_text == "COMMAND_INVALID - invalid authentication mechanism 'EXTERNAL'"
    finally:
        client.close()


# -- client certificates -----------------------------------------------------


def test_verify_peer_accepts_ca_signed_client_with_plain_login(
    mtls_broker: RoostBroker, pki: Pki
) -> None:
    conn = pika.BlockingConnection(pika_params(mtls_broker.tls_port, client_context(pki, "alice")))
    try:
        assert pika_round_trip(conn, "mtls-q") == b"over tls mtls-q"
        # The PLAIN credentials decide the user, not the certificate.
        assert connection_users(mtls_broker) == ["guest"]
    finally:
        conn.close()


def test_verify_peer_offers_external(mtls_broker: RoostBroker, pki: Pki) -> None:
    client = TLSRawClient(mtls_broker.tls_port, client_context(pki, "alice"))
    try:
        assert client.start().mechanisms == "PLAIN AMQPLAIN EXTERNAL"
    finally:
        client.close()


@pytest.mark.parametrize("client", [None, "rogue"])
def test_verify_peer_rejects_client(mtls_broker: RoostBroker, pki: Pki, client: str | None) -> None:
    # No certificate, or one from another CA: the TLS handshake fails (with
    # TLS 1.3 the client learns it on its first read) and AMQP never starts.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_client = TLSRawClient(mtls_broker.tls_port, client_context(pki, client))
        try:
            tls_client.start()
        finally:
            tls_client.close()
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika_params(mtls_broker.tls_port, client_context(pki, client)))
    assert connection_users(mtls_broker) == []


def test_external_login_uses_certificate_cn(mtls_broker: RoostBroker, pki: Pki) -> None:
    params = pika_params(
        mtls_broker.tls_port,
        client_context(pki, "alice"),
        credentials=pika.credentials.ExternalCredentials(),
    )
    conn = pika.BlockingConnection(params)
    try:
        assert connection_users(mtls_broker) == ["alice"]
        assert pika_round_trip(conn, "ext-q") == b"over tls ext-q"
    finally:
        conn.close()


@pytest.mark.parametrize("client", ["nobody", "no-cn"])
def test_external_login_refused_without_matching_user(
    mtls_broker: RoostBroker, pki: Pki, client: str
) -> None:
    tls_client = TLSRawClient(mtls_broker.tls_port, client_context(pki, client))
    try:
        tls_client.start()
        close = tls_client.start_ok("EXTERNAL")
        assert isinstance(close, C.Connection.Close)
        assert close.reply_code == 403
        assert close.reply_text == (
            "ACCESS_REFUSED - Login was refused using authentication mechanism EXTERNAL. "
            "For details see the broker logfile."
        )
    finally:
        tls_client.close()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(
            pika_params(
                mtls_broker.tls_port,
                client_context(pki, client),
                credentials=pika.credentials.ExternalCredentials(),
            )
        )


def test_external_login_with_several_cns_uses_all_of_them(
    mtls_broker: RoostBroker, pki: Pki
) -> None:
    """A certificate with the CNs alice and mallory names the user
    "alice,mallory" (RabbitMQ's rule), never alice alone."""
    params = pika_params(
        mtls_broker.tls_port,
        client_context(pki, "two-cn"),
        credentials=pika.credentials.ExternalCredentials(),
    )
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(params)
    assert mtls_broker.server is not None
    model = mtls_broker.server.broker

    def add_joined() -> None:
        model.users.add("alice,mallory", "unused-secret")
        model.permissions[("alice,mallory", "/")] = (".*", ".*", ".*")

    mtls_broker.call(add_joined)
    conn = pika.BlockingConnection(params)
    try:
        assert connection_users(mtls_broker) == ["alice,mallory"]
    finally:
        conn.close()


def test_plain_listener_does_not_offer_external(mtls_broker: RoostBroker) -> None:
    client = RawClient(mtls_broker.port)
    try:
        client.send(PROTOCOL_HEADER)
        start = client.expect(C.Connection.Start)
        assert isinstance(start, C.Connection.Start)
        assert start.mechanisms == "PLAIN AMQPLAIN"
    finally:
        client.close()


# -- protocol versions ---------------------------------------------------------


def test_min_version_1_3_refuses_tls_1_2(pki: Pki) -> None:
    only_12 = client_context(pki)
    only_12.maximum_version = ssl.TLSVersion.TLSv1_2
    with RoostBroker(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_min_version="1.3"
    ) as broker:
        with pytest.raises(ssl.SSLError):
            TLSRawClient(broker.tls_port, only_12).close()
        tls13 = TLSRawClient(broker.tls_port, client_context(pki))
        try:
            assert tls13.sock.version() == "TLSv1.3"  # type: ignore[attr-defined]
            assert tls13.start().mechanisms == "PLAIN AMQPLAIN"
        finally:
            tls13.close()


def test_default_min_version_accepts_tls_1_2(tls_broker: RoostBroker, pki: Pki) -> None:
    only_12 = client_context(pki)
    only_12.maximum_version = ssl.TLSVersion.TLSv1_2
    client = TLSRawClient(tls_broker.tls_port, only_12)
    try:
        assert client.sock.version() == "TLSv1.2"  # type: ignore[attr-defined]
        assert client.start().mechanisms == "PLAIN AMQPLAIN"
    finally:
        client.close()


def _tls11_client(pki: Pki) -> ssl.SSLContext:
    ctx = client_context(pki)
    # TLS 1.1 needs security level 0 in OpenSSL 3 (SHA-1 signatures).
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


def _in_memory_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> bool:
    """Whether ``client`` and ``server`` can complete a TLS handshake."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, obj in (("c", cli), ("s", srv)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except ssl.SSLError:
                    return False
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done["s"] and done["c"]:
            return True
    return False


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_refused_by_default(tls_broker: RoostBroker, pki: Pki) -> None:
    # Control: this OpenSSL can still speak TLS 1.1 when a server allows it;
    # otherwise the refusal below would prove nothing.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.minimum_version = ssl.TLSVersion.TLSv1_1
    if not _in_memory_handshake(permissive, _tls11_client(pki)):
        pytest.skip("the local OpenSSL cannot negotiate TLS 1.1 at all")
    roost_ctx = server_context(str(pki.server_cert), str(pki.server_key))
    assert roost_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not _in_memory_handshake(roost_ctx, _tls11_client(pki))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        TLSRawClient(tls_broker.tls_port, _tls11_client(pki)).close()


# -- configuration and the command line --------------------------------------


def test_roost_serve_tls_from_environment(pki: Pki, tmp_path: Path) -> None:
    # roost serve in a subprocess (uvloop when installed), TLS configured
    # through ROOST_* variables.
    env = dict(os.environ)
    env["ROOST_TLS_CERT"] = str(pki.server_cert)
    env["ROOST_TLS_KEY"] = str(pki.server_key)
    env["ROOST_TLS_PORT"] = "0"
    proc = RoostProcess(tmp_path / "data", env=env)
    try:
        proc.start()
        assert proc.tls_port not in (0, proc.port)
        assert proc.tls_url.startswith("amqps://guest:guest@127.0.0.1:")
        conn = pika.BlockingConnection(pika_params(proc.tls_port, client_context(pki)))
        try:
            assert pika_round_trip(conn, "proc-q") == b"over tls proc-q"
        finally:
            conn.close()
    finally:
        proc.close()


def test_tls_options_from_toml_file(pki: Pki, tmp_path: Path) -> None:
    toml = tmp_path / "roost.toml"
    toml.write_text(
        "[roost]\n"
        f'tls-cert = "{pki.server_cert}"\n'
        f'tls_key = "{pki.server_key}"\n'
        f'tls_ca = "{pki.ca}"\n'
        "tls_verify_peer = true\n"
        'tls_min_version = "1.3"\n'
        "tls_port = 5999\n"
    )
    cfg = load_config(str(toml), env={})
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) == (
        str(pki.server_cert),
        str(pki.server_key),
        str(pki.ca),
    )
    assert cfg.tls_verify_peer is True
    assert cfg.tls_min_version == "1.3"
    assert cfg.tls_port == 5999
    assert load_config(env={}).tls_port == 5671


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_min_version": "1.1"}, "tls_min_version: expected 1.2 or 1.3, got '1.1'"),
        ({"tls_verify_peer": True}, "tls_key, tls_ca and tls_verify_peer need tls_cert"),
        ({"tls_cert": "c.pem", "tls_verify_peer": True}, "tls_verify_peer: needs tls_ca"),
        ({"tls_port": 70000}, "tls_port: 70000 is not between 0 and 65535"),
    ],
)
def test_invalid_tls_settings(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={}, overrides=settings)
    assert str(err.value).startswith(message)


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "roost",
            "serve",
            "--port",
            "0",
            "--tls-port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    "case", ["missing-cert", "mismatched-key", "encrypted-key", "not-pem", "missing-ca"]
)
def test_bad_certificate_files_exit_1_with_plain_message(
    pki: Pki, tmp_path: Path, case: str
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        serialization.load_pem_private_key(pki.server_key.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    args, expected = {
        "missing-cert": (
            ["--tls-cert", str(missing), "--tls-key", str(pki.server_key)],
            f"roost: cannot read TLS certificate {missing}: No such file or directory",
        ),
        "mismatched-key": (
            ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.other_key)],
            f"roost: cannot load TLS certificate and key from {pki.server_cert} and "
            f"{pki.other_key}: key values mismatch",
        ),
        "encrypted-key": (
            ["--tls-cert", str(pki.server_cert), "--tls-key", str(encrypted)],
            f"roost: TLS key {encrypted} is encrypted; roost needs an unencrypted key",
        ),
        "not-pem": (
            ["--tls-cert", str(junk)],
            f"roost: cannot load TLS certificate and key from {junk}: not a PEM certificate or key",
        ),
        "missing-ca": (
            [
                "--tls-cert",
                str(pki.server_cert),
                "--tls-key",
                str(pki.server_key),
                "--tls-ca",
                str(missing),
                "--tls-verify-peer",
            ],
            f"roost: cannot read TLS CA file {missing}: No such file or directory",
        ),
    }[case]
    result = _serve(tmp_path, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr
    assert "listening" not in result.stdout


def test_server_context_error_is_plain(pki: Pki) -> None:
    with pytest.raises(TLSError, match="key values mismatch"):
        server_context(str(pki.server_cert), str(pki.other_key))
    ctx = server_context(str(pki.server_cert), str(pki.server_key), str(pki.ca), True, "1.3")
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server_context(str(pki.server_cert), str(pki.server_key)).verify_mode == ssl.CERT_NONE


def test_tls_port_in_use_exits_1(pki: Pki, tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        port = blocker.getsockname()[1]
        result = _serve(
            tmp_path,
            "--tls-cert",
            str(pki.server_cert),
            "--tls-key",
            str(pki.server_key),
            "--tls-port",
            str(port),
        )
    finally:
        blocker.close()
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"roost: cannot listen on 127.0.0.1:{port}:"), result.stderr
    assert "Traceback" not in result.stderr
