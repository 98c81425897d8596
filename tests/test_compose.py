"""docker-compose.yml cannot run here (no container engine), so everything short of running it is checked:
it is a valid Compose file (the Compose Specification's JSON schema, vendored in tests/data/, and Debian's
`docker-compose config` where installed); each service's command is what the tested launcher builds
(server/launch.py), its executable runs here with `--help` and knows every flag the service passes; and it is
secure by default (TLS and SuperNode authentication, no plain HTTP beyond a hospital's own loopback, nothing
published but the API on 127.0.0.1, each container seeing only its own key, secret and data)."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from common.settings import Settings
from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
# https://github.com/compose-spec/compose-spec/blob/170098ba07d9f53c383a41bfd4c5166b0a4529a6/schema/compose-spec.json
# (Apache-2.0, see tests/data/README.md)
SCHEMA = REPO / "tests" / "data" / "compose-spec.json"
HOSPITALS = (1, 2, 3)
BIN = Path(sys.executable).parent
SECRET, PORT = "/certs/superexec.secret", 9094


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict:
    return _compose()["services"]


def _security():
    from server.certs import TlsFiles
    from server.security import Security

    return Security(tls=TlsFiles(Path("/certs/ca.crt"), Path("/certs/superlink.crt"), Path("/certs/superlink.key")),
                    supernode_auth=True, node_keys={f"hospital_{k}": Path("/certs/node.key") for k in HOSPITALS})


# ------------------------------------------------------------------------------------------------ valid file
def test_compose_file_is_valid_against_the_compose_specification():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(_compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_debian_docker_compose_accepts_the_file():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("Debian's docker-compose is not installed (apt-get install docker-compose); the schema check ran")
    # the system's Python, not this venv's packages (PYTHONPATH may point there after a Flower/Ray run)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}, "FEDXRAY_API_KEY": "a-key"}
    r = subprocess.run([exe, "-f", str(COMPOSE), "config", "-q"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([exe, "-f", str(COMPOSE), "config", "--services"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60).stdout.split()
    assert set(out) == set(_services())


# -------------------------------------------------------------------------------------- the launcher's commands
def test_service_commands_are_what_the_launcher_builds():
    """SuperLink, SuperNodes (`--isolation process`) and the warm SuperExec beside each, as LocalFederation
    starts them with TLS and SuperNode auth. The SuperExec's argv[0] is the host's interpreter there and
    the image's `python` here; the SuperNode is PID 1 of the namespace the SuperExec shares."""
    from server.launch import superexec_command, superlink_command, supernode_command

    services, sec = _services(), _security()
    assert services["superlink"]["command"] == superlink_command("0.0.0.0", 9091, "/flwr/state.db",
                                                                 sec.superlink_args())
    for k in HOSPITALS:
        site, node = f"hospital_{k}", f"hospital-{k}"
        assert services[node]["command"] == supernode_command(
            "superlink:9091", PORT, "/data/hospital", site, sec.supernode_args(site), executor="warm",
            superexec_secret=SECRET)
        exe = services[f"superexec-{node}"]
        assert exe["command"] == ["python", *superexec_command(PORT, 1, SECRET)[1:]]
        assert exe["network_mode"] == exe["pid"] == f"service:{node}"
        assert node in exe["depends_on"]


def _script_commands(script: Path) -> list[list[str]]:
    """The `flwr ...` command lines of a docker/ shell script."""
    out = []
    for line in script.read_text().splitlines():
        m = re.search(r"(?:^|exec\s+|\$\()\s*(flwr\s[^)|;&]*)", line.split("#")[0])
        if m:
            out.append(shlex.split(re.sub(r"\s\d?>&?\d?\S*", " ", m.group(1))))
    return out


def _invocations() -> dict[str, list[list[str]]]:
    """{service: [argv]} of what each container runs; the docker/ scripts contribute their commands."""
    out: dict[str, list[list[str]]] = {}
    for name, svc in _services().items():
        cmd = list(svc["command"])
        if svc.get("entrypoint"):   # certs: `fedxray "$@"` with the command as its arguments
            assert 'fedxray "$$@"' in svc["entrypoint"][2], svc["entrypoint"]
            cmd = ["fedxray", *cmd]
        if cmd[0].startswith("/app/docker/"):
            out[name] = _script_commands(REPO / cmd[0].removeprefix("/app/"))
            assert out[name], f"{cmd[0]} runs no flwr command this test knows how to check"
        else:
            out[name] = [cmd]
    return out


def _help_argv(cmd: list[str]) -> tuple[list[str], list[str]]:
    """(the command's `--help` here, the flags it was given). The subcommand is the leading plain words."""
    if cmd[:2] == ["python", "-m"]:
        head, rest = [sys.executable, "-m", cmd[2]], cmd[3:]
    else:
        exe = BIN / cmd[0]
        assert exe.is_file(), f"{cmd[0]} is not installed in the venv"
        words = []
        for tok in cmd[1:]:
            if not re.fullmatch(r"[a-z]+", tok):
                break
            words.append(tok)
        head, rest = [str(exe), *words], cmd[1 + len(words):]
    return [*head, "--help"], [t for t in rest if t.startswith("--")]


def test_every_service_command_runs_here_and_knows_each_flag_it_is_given():
    """A flag renamed or removed by a Flower (or fedxray) upgrade fails here, not at a hospital."""
    checked: dict[tuple[str, ...], str] = {}
    for service, commands in _invocations().items():
        for cmd in commands:
            argv, flags = _help_argv(cmd)
            if tuple(argv) not in checked:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                   env={**os.environ, "FLWR_HOME": "/nonexistent-flwr-home", "COLUMNS": "200"})
                assert r.returncode == 0, f"{service}: {' '.join(argv)} failed: {r.stderr[-2000:]}"
                checked[tuple(argv)] = r.stdout
            text = checked[tuple(argv)]
            missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
            assert not missing, f"{service}: {' '.join(cmd[:3])} does not know {missing}"
    names = {" ".join([Path(a[0]).name, *a[1:-1]]) for a in checked}
    assert {"flower-superlink", "flower-supernode", f"{Path(sys.executable).name} -m fedxray.warm_exec",
            "fedxray certs", "fedxray serve", "flwr supernode register", "flwr run"} <= names, names


# ----------------------------------------------------------------------------------------- secure by default
def test_compose_is_secure_by_default():
    compose, services = _compose(), _services()
    for name, svc in services.items():
        cmd = svc["command"]
        if "--insecure" in cmd:   # only a SuperExec, to its own SuperNode's Runtime API on their shared loopback
            assert name.startswith("superexec-") and svc["network_mode"] == f"service:{name.removeprefix('superexec-')}"
            assert cmd[cmd.index("--runtime-api-address") + 1].startswith("127.0.0.1:"), cmd
            assert "--superexec-auth-secret-file" in cmd
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
        assert flag in services["superlink"]["command"]
    published = {name: svc["ports"] for name, svc in services.items() if "ports" in svc}
    assert published == {"serve": ["127.0.0.1:8000:8000"]}
    assert "FEDXRAY_API_KEY:?" in services["serve"]["environment"]["FEDXRAY_API_KEY"]
    secrets = []
    for k in HOSPITALS:
        node, exe = services[f"hospital-{k}"], services[f"superexec-hospital-{k}"]
        assert "--root-certificates" in node["command"] and "--auth-supernode-private-key" in node["command"]
        secret = f"./certs/superexec/hospital_{k}.secret:{SECRET}:ro"
        # the SuperNode: the CA, its own key and secret, no data; its SuperExec (which runs the ClientApps):
        # the same secret and its hospital's data, no key
        assert sorted(node["volumes"]) == sorted(["./certs/ca.crt:/certs/ca.crt:ro",
                                                  f"./certs/nodes/hospital_{k}:/certs/node.key:ro", secret])
        assert sorted(exe["volumes"]) == sorted([secret, f"./data/synth/hospital_{k}:/data/hospital:ro"])
        secrets.append(f"hospital_{k}")
    certs = services["certs"]["command"]
    assert certs[:3] == ["certs", "--out", "/certs"] and "--superexec-secrets" in certs
    assert [certs[i + 1] for i, t in enumerate(certs) if t == "--hospital"] == secrets
    docker_rc = tomllib.loads((REPO / "docker" / "run-config.toml").read_text())
    s = Settings.from_run_config(docker_rc)
    assert s.federation.server_data_path == "/data/holdout" and s.federation.min_available_nodes == len(HOSPITALS)
    assert "./data/synth/holdout:/data/holdout:ro" in services["superlink"]["volumes"]
    connection = (REPO / "docker" / "connection.sh").read_text()
    assert 'root-certificates = "/certs/ca.crt"' in connection and "insecure" not in connection
    for script in ("submit.sh", "register.sh"):
        assert ". /app/docker/connection.sh" in (REPO / "docker" / script).read_text()
    assert "certs" in (REPO / ".dockerignore").read_text().split()      # keys never baked into the image
    assert "--insecure" not in yaml.safe_dump({k: v for k, v in compose.items() if k != "services"})


def test_certs_writes_a_private_superexec_secret_per_hospital(tmp_path):
    """What the compose `certs` service runs: 32 raw random bytes per hospital, owner-only, never replaced
    silently (a running SuperNode and SuperExec pair would stop agreeing)."""
    from fedxray.cli import main

    args = ["certs", "--out", str(tmp_path), "--no-tls", "--superexec-secrets", "--hospital", "a", "--hospital", "b"]
    assert main(args) == 0
    a, b = (tmp_path / "superexec" / f"{n}.secret" for n in "ab")
    assert len(a.read_bytes()) == 32 and a.read_bytes() != b.read_bytes()
    assert a.stat().st_mode & 0o777 == 0o600
    from common.errors import FedxrayError
    from server.certs import make_superexec_secret

    before = a.read_bytes()
    with pytest.raises(FedxrayError, match="exists"):
        make_superexec_secret(tmp_path, "a")
    assert a.read_bytes() == before
