"""Certificates and node keys for a test deployment (SuperLink TLS + SuperNode authentication).

``python -m simulations.deploy.certs OUT_DIR --nodes 3 [--san 192.168.1.10] [--san gpu-server]``
(or ``fedpeft deploy certs ...``) writes::

    OUT_DIR/ca.crt, ca.key                 a self-signed CA (give ca.crt to every node and to `flwr`)
    OUT_DIR/server.pem, server.key         the SuperLink's certificate, signed by the CA; SANs
                                           127.0.0.1 and localhost plus every --san
    OUT_DIR/node-<i>, node-<i>.pub         one EC P-384 key pair per SuperNode, OpenSSH format
                                           (`flower-supernode --auth-supernode-private-key node-<i>`,
                                           `flwr supernode register node-<i>.pub`)

For a test deployment only: keys are unencrypted on disk and the CA lives beside them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from simulations.front_door import positive_int

DEFAULT_SANS = ("127.0.0.1", "localhost")
VALID_DAYS = 365


@dataclass(frozen=True)
class DeploymentCerts:
    """Paths of everything :func:`make_deployment_certs` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]

    def node_public_key(self, index: int) -> Path:
        """The OpenSSH public key of node ``index`` (what ``flwr supernode register`` takes)."""
        return self.node_keys[index].with_suffix(".pub")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpeft test deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])  # fmt: skip


def san_entry(host: str) -> x509.GeneralName:
    """An IP address SAN for addresses, a DNS SAN for names."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def build_ca(now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key."""
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedpeft test CA"))
        .issuer_name(_name("fedpeft test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(key, hashes.SHA256())
    )
    return cert, key


def build_server_cert(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, sans: list[str], now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The SuperLink's TLS certificate for ``sans``, signed by the CA."""
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(sans[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([san_entry(h) for h in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _write(path: Path, data: bytes, private: bool) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_node_key(path: Path) -> Path:
    """An EC P-384 key pair in OpenSSH format: ``path`` (private) and ``path.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(path, private, private=True)
    _write(path.with_suffix(".pub"), public + b"\n", private=False)
    return path


def make_deployment_certs(out_dir: str | Path, *, num_nodes: int, sans: list[str] | None = None) -> DeploymentCerts:
    """Write the CA, the SuperLink certificate and ``num_nodes`` node key pairs to ``out_dir``."""
    if num_nodes < 1:
        raise ValueError(
            f"num_nodes={num_nodes}: a deployment needs at least one SuperNode key pair; pass --nodes >= 1"
        )
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"{out_dir} is a file; pass a folder for the certificates")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hosts = list(DEFAULT_SANS) + [h for h in (sans or []) if h not in DEFAULT_SANS]
    now = dt.datetime.now(dt.UTC)
    ca_cert, ca_key = build_ca(now)
    server_cert, server_key = build_server_cert(ca_cert, ca_key, hosts, now)
    pem = serialization.Encoding.PEM
    _write(out / "ca.crt", ca_cert.public_bytes(pem), private=False)
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "server.pem", server_cert.public_bytes(pem), private=False)
    _write(out / "server.key", _pem_key(server_key), private=True)
    nodes = tuple(write_node_key(out / f"node-{i}") for i in range(num_nodes))
    return DeploymentCerts(out / "ca.crt", out / "server.pem", out / "server.key", nodes)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m simulations.deploy.certs OUT_DIR --nodes N [--san HOST ...]``."""
    parser = argparse.ArgumentParser(prog="fedpeft deploy certs", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--nodes", type=positive_int, default=2, help="how many SuperNode key pairs (default 2)")
    parser.add_argument(
        "--san", action="append", default=[], help="extra host name or IP of the SuperLink (repeatable)"
    )
    args = parser.parse_args(argv)
    certs = make_deployment_certs(args.out_dir, num_nodes=args.nodes, sans=args.san)
    print(f"CA {certs.ca_cert}\nSuperLink {certs.server_cert} {certs.server_key}")
    for i, key in enumerate(certs.node_keys):
        print(f"node {i}: {key} {certs.node_public_key(i)}")
    return 0


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
