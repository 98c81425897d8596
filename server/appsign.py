"""Approved code only: sign the fedxray FAB and serve it so that Flower's SuperNodes can verify it.

How Flower 1.42 verifies apps (read from the installed source):
* `flower-supernode --trusted-entities FILE.yaml` ({key id: "ssh-ed25519 AAAA..."}) makes the node check every
  new run's FAB before it runs anything (`supernode/start_client_internal.py:_verify_fab`): an Ed25519 signature
  over `signed_at (8 bytes, big endian) + sha256(FAB)` by one of the listed keys, else an error reply
  (`ErrorCode.INVALID_FAB`) and nothing runs.
* The SuperLink attaches signatures to a FAB ONLY when it fetched the app from Flower Hub
  (`superlink/servicer/control/control_handlers.py:_get_remote_fab` -> `_format_verification`, which also sets
  `valid_license`). A FAB sent by `flwr run <dir>` is stored with no verifications at all, so a node with
  trusted entities refuses every local app ("App verification is not supported by the connected SuperLink").
* Signing exists only as `flwr app review`, which downloads an app from Flower Hub, needs a Hub login, and
  uploads the signature to the Hub (`cli/app_cmd/review.py`). There is no offline `flwr` command to sign a FAB.
* The Hub address is `FLWR_SUPERGRID_API_URL` (`supercore/constant.py`), read from the environment.

So this module plays the Hub's two endpoints on loopback (or inside the federation's network): `AppRegistry`
serves FABs the operator signed here, in Flower's signature format, and the SuperLink started with
`FLWR_SUPERGRID_API_URL=<registry>` fetches them for `flwr run @fedxray/fedxray==X.Y.Z <connection>`. The
verification that matters runs in the hospital's unmodified `flower-supernode`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from common.errors import FedxrayError

KEY_ID = "fedxray-release"   # the trusted-entities id of the release signing key


PRUNED = (".git", ".venv", "node_modules")   # never walked, whatever .gitignore says


def app_files(app_dir: str | Path) -> dict[str, Path]:
    """The app folder's files as Flower's `collect_files` lists them, without walking folders the FAB can never
    contain (.git, .venv, what .gitignore excludes as a folder): Flower walks the whole tree, a virtualenv's
    tens of thousands of files included, for 3-4 s on every `flwr run`. Flower's own rules still decide."""
    import os

    import pathspec

    root = Path(app_dir).resolve()
    ignore = root / ".gitignore"
    spec = pathspec.GitIgnoreSpec.from_lines(ignore.read_text().splitlines() if ignore.is_file() else [])
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel = "" if rel_dir == "." else f"{rel_dir}/"
        dirnames[:] = [d for d in dirnames if d not in PRUNED and not spec.match_file(f"{rel}{d}/")
                       and not (Path(dirpath) / d).is_symlink()]
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink() and path.resolve().is_relative_to(root):
                files[f"{rel}{name}"] = path
    return files


def build_fab(app_dir: str | Path) -> bytes:
    """The FAB `flwr run <app_dir>` would send (Flower's own builder: same include/exclude rules)."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(app_files(app_dir))[0]


def stage_app(app_dir: str | Path, dest: str | Path) -> Path:
    """`dest` holding exactly the files of the app's FAB, so `flwr run dest` builds the same FAB without
    walking the source tree (see app_files); replaced on every call, so a run always ships the current code."""
    import io
    import shutil
    import zipfile

    src, dest = Path(app_dir).resolve(), Path(dest)
    names = [n for n in zipfile.ZipFile(io.BytesIO(build_fab(src))).namelist() if not n.startswith(".info/")]
    tmp = dest.with_name(dest.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    for n in names:
        (tmp / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / n, tmp / n)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    return dest


def app_spec(app_dir: str | Path) -> tuple[str, str]:
    """('@publisher/name', 'x.y.z') from the app's pyproject.toml: what `flwr run @...` asks for."""
    import tomllib

    cfg = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text())
    return f"@{cfg['tool']['flwr']['app']['publisher']}/{cfg['project']['name']}", cfg["project"]["version"]


def _load_signer(path: str | Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise FedxrayError(f"{path}: app signing needs an Ed25519 OpenSSH key (`fedxray certs --signing-key`)")
    return key


def sign_fab(fab: bytes, private_key: str | Path, key_id: str, signed_at: int | None = None) -> dict:
    """One verification entry as Flower Hub returns it: public_key_id, signature (base64url), signed_at."""
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    ts = int(time.time()) if signed_at is None else signed_at
    sig = _load_signer(private_key).sign(create_message_to_sign(hashlib.sha256(fab).digest(), ts))
    return {"public_key_id": key_id, "signature": base64.urlsafe_b64encode(sig).rstrip(b"=").decode(),
            "signed_at": ts}


def write_trusted_entities(path: str | Path, keys: dict[str, str | Path]) -> Path:
    """The YAML `flower-supernode --trusted-entities` reads: {key id: OpenSSH Ed25519 public key line}."""
    lines = []
    for key_id, pub in keys.items():
        text = Path(pub).read_text().split() if Path(str(pub)).is_file() else str(pub).split()
        lines.append(f"{json.dumps(key_id)}: {json.dumps(' '.join(text[:2]))}\n")
    path = Path(path)
    path.write_text("".join(lines))
    return path


@dataclass
class _Published:
    fab: bytes
    verifications: list[dict] | None


@dataclass
class AppRegistry:
    """Flower Hub's `POST /hub/fetch-fab` and the FAB download, for apps published here; a thread on `host`."""

    host: str = "127.0.0.1"
    apps: dict[tuple[str, str], _Published] = field(default_factory=dict)

    def publish(self, app_id: str, version: str, fab: bytes, verifications: list[dict] | None) -> None:
        """Make `app_id==version` fetchable; verifications=None publishes it unsigned."""
        self.apps[(app_id, version)] = _Published(fab, verifications)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._server.server_address[1]}"

    def __enter__(self) -> "AppRegistry":
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                app = registry.apps.get((req.get("app_id"), req.get("app_version")))
                if self.path.rstrip("/").endswith("/hub/fetch-fab") and app is not None:
                    body = {"fab_url": f"{registry.url}/fab/{req['app_id'].lstrip('@')}/{req['app_version']}"}
                    if app.verifications is not None:
                        body["verifications"] = app.verifications
                    return self._send(200, json.dumps(body).encode())
                self._send(404, json.dumps({"detail": "app not published in this registry"}).encode())

            def do_GET(self):  # noqa: N802
                parts = self.path.strip("/").split("/")
                if len(parts) == 4 and parts[0] == "fab":
                    app = registry.apps.get((f"@{parts[1]}/{parts[2]}", parts[3]))
                    if app is not None:
                        return self._send(200, app.fab, "application/octet-stream")
                self._send(404, b"{}")

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def tamper(app_dir: str | Path, member: str = "client/app.py", payload: bytes = b"\n# tampered\n") -> bytes:
    """A FAB of the app with one file changed and rebuilt consistently (its own file-hash manifest matches),
    as an attacker between signer and hospital would send it: only the signature can tell."""
    from flwr.cli.build import build_fab_from_files
    from flwr.cli.utils import collect_files

    files: dict[str, bytes | Path] = dict(collect_files(Path(app_dir).resolve()))
    files[member] = Path(files[member]).read_bytes() + payload
    return build_fab_from_files(files)[0]


def publish_signed(stack, app_dir: str | Path, signing_key: str | Path, security, workdir: str | Path):
    """Sign the app's FAB, serve it from an AppRegistry kept open by `stack`, and make `security` use it:
    returns (app spec for `flwr run`, Security with trusted entities and the registry URL)."""
    pub = Path(f"{signing_key}.pub")
    if not pub.is_file():
        raise FedxrayError(f"{pub} not found: the signing key's public half must sit beside it "
                           "(`fedxray certs --signing-key` writes both)")
    app_id, version = app_spec(app_dir)
    fab = build_fab(app_dir)
    registry = stack.enter_context(AppRegistry())
    registry.publish(app_id, version, fab, [sign_fab(fab, signing_key, KEY_ID)])
    trusted = write_trusted_entities(Path(workdir) / "trusted-entities.yaml", {KEY_ID: pub})
    return f"{app_id}=={version}", security.with_(trusted_entities=trusted, registry_url=registry.url)
