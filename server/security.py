"""How a local federation is protected: TLS, SuperNode authentication, approved (signed) apps.

`Security` turns the key material of `fedxray certs` into Flower 1.42 flags (facts in ../shared/notes):
* TLS: SuperLink `--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`; SuperNodes and the `flwr` CLI trust the CA
  (`--root-certificates`, `root-certificates` in the connection). `--insecure` only via `Security.insecure()`.
* SuperNode auth: SuperLink `--enable-supernode-auth` (needs TLS); each hospital's public key is registered
  with `flwr supernode register` before its node starts with `--auth-supernode-private-key`; an unknown key
  ends the node with exit code 305.
* Approved code: nodes get `--trusted-entities`; the SuperLink fetches signed FABs from `registry_url`
  (`FLWR_SUPERGRID_API_URL`, see server/appsign.py) and runs are submitted as `@fedxray/fedxray==X.Y.Z`.
"""
from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from common.errors import FedxrayError
from server.certs import TlsFiles, make_node_key, make_tls, tls_files

UNREGISTERED_EXIT = 305   # Flower's exit code for "Failed to activate SuperNode" (also a failed TLS handshake);
# it is logged as "Exit Code: 305" while the process itself exits with status 1 (flwr/supercore/exit/exit.py).


def flower_exit_code(log_text: str) -> int | None:
    """The last `Exit Code: N` a Flower process logged (its OS exit status is only 0 or 1)."""
    import re

    codes = re.findall(r"Exit Code: (\d+)", log_text)
    return int(codes[-1]) if codes else None


@dataclass(frozen=True)
class Security:
    tls: TlsFiles | None
    supernode_auth: bool = False
    node_keys: dict[str, Path] = field(default_factory=dict)     # hospital -> OpenSSH private key
    trusted_entities: Path | None = None
    registry_url: str | None = None

    @classmethod
    def insecure(cls) -> "Security":
        """Plain HTTP on loopback, no authentication: tests of other things and debugging only."""
        return cls(tls=None)

    @classmethod
    def generate(cls, folder: str | Path, hospitals: list[str] = (), *, auth: bool = False) -> "Security":
        """Fresh CA + SuperLink certificate for localhost (and, with `auth`, a key pair per hospital) in `folder`;
        existing files there are reused, so a restarted federation keeps its identities."""
        folder = Path(folder)
        tls = tls_files(folder) if (folder / "ca.crt").is_file() else make_tls(folder, ["127.0.0.1", "localhost"])
        keys = {}
        if auth:
            for h in hospitals:
                priv = folder / "nodes" / h
                keys[h] = priv if priv.is_file() else make_node_key(folder, h)[0]
        return cls(tls=tls, supernode_auth=auth, node_keys=keys)

    def to_json(self) -> dict:
        """File paths and switches only (never key material): a standing federation's record of its transport."""
        return {"tls": None if self.tls is None else {k: str(getattr(self.tls, k)) for k in ("ca", "cert", "key")},
                "supernode_auth": self.supernode_auth, "node_keys": {h: str(k) for h, k in self.node_keys.items()},
                "trusted_entities": str(self.trusted_entities) if self.trusted_entities else None,
                "registry_url": self.registry_url}

    @classmethod
    def from_json(cls, d: dict) -> "Security":
        return cls(tls=TlsFiles(**{k: Path(v) for k, v in d["tls"].items()}) if d.get("tls") else None,
                   supernode_auth=bool(d.get("supernode_auth")),
                   node_keys={h: Path(k) for h, k in d.get("node_keys", {}).items()},
                   trusted_entities=Path(d["trusted_entities"]) if d.get("trusted_entities") else None,
                   registry_url=d.get("registry_url"))

    def with_(self, **changes) -> "Security":
        return replace(self, **changes)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def superlink_args(self) -> list[str]:
        if self.tls is None:
            if self.supernode_auth:
                raise FedxrayError("SuperNode authentication needs TLS: drop --insecure")
            return ["--insecure"]
        args = ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                "--ssl-keyfile", str(self.tls.key)]
        return args + (["--enable-supernode-auth"] if self.supernode_auth else [])

    def superlink_env(self) -> dict[str, str]:
        return {"FLWR_SUPERGRID_API_URL": self.registry_url} if self.registry_url else {}

    def supernode_args(self, hospital: str, *, trust_ca: bool = True, key: Path | None = None) -> list[str]:
        """Flags of one hospital's node; `trust_ca=False` / another `key` make the misconfigured nodes tests need."""
        if self.tls is None:
            args = ["--insecure"]
        else:
            args = ["--root-certificates", str(self.tls.ca)] if trust_ca else []
        key = key or self.node_keys.get(hospital)
        if self.supernode_auth:
            if key is None:
                raise FedxrayError(f"no SuperNode key for {hospital}: create one with `fedxray certs --no-tls "
                                   f"--hospital {hospital}` and register its .pub")
        if key is not None:
            args += ["--auth-supernode-private-key", str(key)]
        if self.trusted_entities is not None:
            args += ["--trusted-entities", str(self.trusted_entities)]
        return args

    def connection(self) -> dict:
        """The transport keys of a `[superlink.<name>]` connection for the `flwr` CLI."""
        return {"root-certificates": str(self.tls.ca)} if self.tls else {"insecure": True}

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.tls.ca)) if self.tls else None


def register_node(public_key: str | Path, connection: str, env: dict, timeout: float = 120.0) -> str:
    """`flwr supernode register KEY.pub <connection>`: the SuperLink will accept this hospital's node."""
    r = subprocess.run(["flwr", "supernode", "register", str(public_key), connection], env=env, capture_output=True,
                       text=True, timeout=timeout)
    if "Public key already in use" in r.stdout + r.stderr:   # a restarted SuperLink keeps its database
        return r.stdout
    if r.returncode != 0 or "registered successfully" not in r.stdout:
        raise FedxrayError(f"could not register {public_key}: {(r.stdout + r.stderr).strip()[-800:]}")
    return r.stdout
