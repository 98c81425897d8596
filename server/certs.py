"""`fedxray certs`: the key material a federation needs, made with `cryptography` (no openssl binary).

* TLS: a CA (ca.crt/ca.key) and the SuperLink's certificate (superlink.crt/.key) for the host names and
  IPs the hospitals dial; IP:127.0.0.1 and DNS:localhost are always included. SuperNodes trust ca.crt.
* SuperNode authentication: one OpenSSH ECDSA P-384 key pair per hospital (nodes/<name>, nodes/<name>.pub).
  Flower 1.42 accepts EC keys on NIST curves; the public half is registered on the SuperLink with
  `flwr supernode register`, the private half stays in the hospital.
* App signing: an Ed25519 OpenSSH key pair (signing/app-signer, .pub). Flower's SuperNode verifies FABs
  against Ed25519 public keys listed in its `--trusted-entities` YAML (see server/appsign.py).

Private keys are written 0600 and never overwritten unless asked (`--force`): replacing the CA silently
would lock every hospital out.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import FedxrayError

ALWAYS_SAN = ("localhost", "127.0.0.1")
PEM, OPENSSH = serialization.Encoding.PEM, serialization.Encoding.OpenSSH


@dataclass(frozen=True)
class TlsFiles:
    """What the SuperLink serves with (cert/key) and what every client trusts (ca)."""

    ca: Path
    cert: Path
    key: Path


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise FedxrayError(f"{path} exists; keep it (hospitals may already trust it) or pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedxray"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys([*hosts, *ALWAYS_SAN]):  # ordered, deduplicated
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_tls(out: Path, hosts: list[str], days: int = 825, force: bool = False) -> TlsFiles:
    """A CA and a SuperLink server certificate signed by it (P-384 keys, SHA-384)."""
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedxray federation CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else "localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    files = TlsFiles(out / "ca.crt", out / "superlink.crt", out / "superlink.key")
    _write(out / "ca.key", _key_pem(ca_key), True, force)
    _write(files.ca, ca.public_bytes(PEM), False, force)
    _write(files.key, _key_pem(key), True, force)
    _write(files.cert, cert.public_bytes(PEM), False, force)
    return files


def make_node_key(out: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """A hospital's SuperNode key pair in OpenSSH format (ECDSA P-384): (private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = out / "nodes" / name, out / "nodes" / f"{name}.pub"
    _write(priv, key.private_bytes(PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), True, force)
    _write(pub, key.public_key().public_bytes(OPENSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode(),
           False, force)
    return priv, pub


def make_superexec_secret(out: Path, name: str, force: bool = False) -> Path:
    """32 random bytes (0600) shared by one hospital's SuperNode and its warm SuperExec (`--superexec-auth-secret-file`,
    read as raw bytes): what a container deployment uses where server/launch.py writes its own per launch."""
    path = out / "superexec" / f"{name}.secret"
    _write(path, os.urandom(32), True, force)
    return path


def make_signing_key(out: Path, name: str = "app-signer", force: bool = False) -> tuple[Path, Path]:
    """An Ed25519 OpenSSH key pair for signing FABs (what `--trusted-entities` checks): (private, public)."""
    key = ed25519.Ed25519PrivateKey.generate()
    priv, pub = out / "signing" / name, out / "signing" / f"{name}.pub"
    _write(priv, key.private_bytes(PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), True, force)
    _write(pub, key.public_key().public_bytes(OPENSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode(),
           False, force)
    return priv, pub


def tls_files(folder: str | Path) -> TlsFiles:
    """The TLS files `make_tls` wrote to `folder`, checked to exist."""
    folder = Path(folder)
    files = TlsFiles(folder / "ca.crt", folder / "superlink.crt", folder / "superlink.key")
    missing = [str(p) for p in (files.ca, files.cert, files.key) if not p.is_file()]
    if missing:
        raise FedxrayError(f"TLS files missing: {missing}; create them with `fedxray certs --out {folder} "
                           "--host <superlink host name>` or run with --insecure (testing only)")
    return files


def add_commands(sub) -> None:
    c = sub.add_parser("certs", help="TLS CA + SuperLink certificate, hospital SuperNode keys, app-signing key")
    c.add_argument("--out", default="certs", help="folder to write into (default: certs)")
    c.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                   help="SuperLink host name or IP the hospitals dial (repeatable); localhost and 127.0.0.1 are "
                        "always included")
    c.add_argument("--hospital", action="append", default=[], metavar="NAME",
                   help="write an OpenSSH ECDSA P-384 key pair for this hospital's SuperNode (repeatable)")
    c.add_argument("--superexec-secrets", action="store_true",
                   help="also write superexec/NAME.secret for each --hospital: the secret its SuperNode and its "
                        "warm SuperExec (python -m fedxray.warm_exec) share (docker-compose.yml)")
    c.add_argument("--signing-key", action="store_true", help="write an Ed25519 app-signing key pair")
    c.add_argument("--no-tls", action="store_true", help="only node/signing keys (keep an existing CA)")
    c.add_argument("--days", type=int, default=825, help="certificate validity")
    c.add_argument("--force", action="store_true", help="replace existing files (hospitals must then re-trust)")
    c.set_defaults(func=_cmd_certs)


def _cmd_certs(a) -> int:
    out = Path(a.out)
    if not a.no_tls:
        files = make_tls(out, a.host, a.days, a.force)
        print(f"CA:        {files.ca}  (give this to every hospital: --root-certificates)")
        print(f"SuperLink: {files.cert} {files.key}  (SAN: {', '.join(dict.fromkeys([*a.host, *ALWAYS_SAN]))})")
        print(f"CA key:    {out / 'ca.key'}  (keep offline)")
    for name in a.hospital:
        priv, pub = make_node_key(out, name, a.force)
        print(f"{name}: {priv} (stays in the hospital: --auth-supernode-private-key)  {pub} (register: "
              f"flwr supernode register {pub} <connection>)")
        if a.superexec_secrets:
            print(f"{name}: {make_superexec_secret(out, name, a.force)} (its SuperNode and SuperExec only)")
    if a.signing_key:
        priv, pub = make_signing_key(out, force=a.force)
        print(f"app signing: {priv} (signer)  {pub} (hospitals list it in --trusted-entities)")
    return 0
