"""TLS and mutual TLS on the scoring port, with certificates generated for the test."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tests.helpers import build_small_model
from tests.server_harness import run_server


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("test-ca", ca_key, None, ca_key, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    files = {
        "ca.pem": _pem(ca),
        "server.pem": _pem(_cert("localhost", server_key, ca, ca_key, ca=False, server=True)),
        "server.key": _pem_key(server_key),
        "client.pem": _pem(_cert("frontend", client_key, ca, ca_key, ca=False)),
        "client.key": _pem_key(client_key),
        "rogue.pem": _pem(_cert("rogue", rogue_key, None, rogue_key, ca=False)),
        "rogue.key": _pem_key(rogue_key),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in files}


def _score(target: str, credentials: grpc.ChannelCredentials | None) -> int:
    channel = (grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target))
    with channel:
        stub = scoring_pb2_grpc.ScorerStub(channel)  # type: ignore[no-untyped-call]
        return len(stub.Score(scoring_pb2.ScoreRequest(query="北京"), timeout=10).scores)


def test_tls_and_mutual_tls(pki: dict[str, Path], tmp_path: Path) -> None:
    build_small_model(tmp_path, version=1)
    ca = pki["ca.pem"].read_bytes()
    tls = ("--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"]))
    with run_server(tmp_path, *tls, credentials=grpc.ssl_channel_credentials(root_certificates=ca)) as srv:
        assert _score(srv.target, grpc.ssl_channel_credentials(root_certificates=ca)) == 4
        with pytest.raises(grpc.RpcError):
            _score(srv.target, None)  # plaintext to a TLS port fails

    good = grpc.ssl_channel_credentials(ca, pki["client.key"].read_bytes(), pki["client.pem"].read_bytes())
    with run_server(tmp_path, *tls, "--tls-client-ca", str(pki["ca.pem"]), credentials=good) as srv:
        assert _score(srv.target, good) == 4
        for creds in [grpc.ssl_channel_credentials(root_certificates=ca),
                      grpc.ssl_channel_credentials(ca, pki["rogue.key"].read_bytes(), pki["rogue.pem"].read_bytes())]:
            with pytest.raises(grpc.RpcError) as err:
                _score(srv.target, creds)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
