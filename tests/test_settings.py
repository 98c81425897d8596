"""One settings model (common/settings.py) for centralised, federated and simulated runs, and the run configs
derived from it: pyproject's [tool.flwr.app.config], docker/run-config.toml, `fedxray settings --flwr`."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, parse_config_args

from common.errors import SettingsError
from common.settings import Settings, load_settings
from tests.conftest import SYNTH_FINDINGS
from tests.run_support import TINY

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_and_docker_run_configs_are_the_ones_settings_derive():
    """What Flower reads (pyproject flattened its way) is Settings() exactly; the docker federation's file is the
    demo profile with the containers' paths. After changing a setting: scripts/sync_run_config.py."""
    from scripts.sync_run_config import docker_text, pyproject_text

    pyproject = (REPO / "pyproject.toml").read_text()
    table = tomllib.loads(pyproject)["tool"]["flwr"]["app"]["config"]
    assert flatten_dict(table) == Settings().to_run_config()
    assert pyproject == pyproject_text(pyproject), "run scripts/sync_run_config.py"
    assert (REPO / "docker" / "run-config.toml").read_text() == docker_text(), "run scripts/sync_run_config.py"
    docker = Settings.from_run_config(flatten_dict(tomllib.loads(docker_text())))
    assert docker.profile == "demo" and docker.federation.server_data_path == "/data/holdout"


def test_the_run_config_round_trips_with_unset_values_and_lists():
    s = Settings.build("demo", {"privacy.noise_multiplier": 1.3, "privacy.target_epsilon": None,
                                "data.split_fractions": [0.8, 0.1, 0.1], "data.max_samples": None})
    rc = s.to_run_config()
    assert all(isinstance(v, (bool, int, float, str)) for v in rc.values())   # what Flower's run config holds
    assert rc["privacy.target_epsilon"] == "" and rc["data.findings"] == ",".join(SYNTH_FINDINGS)
    back = Settings.from_run_config(rc)
    assert back == s and back.privacy.target_epsilon is None and back.data.split_fractions == (0.8, 0.1, 0.1)
    assert back.fingerprint() == s.fingerprint() != Settings().fingerprint()


def test_fedxray_settings_writes_a_file_flower_and_every_command_read_the_same(tmp_path, capsys):
    from fedxray.cli import main

    assert main(["settings", "--profile", "demo", "--set", "federation.rounds=3", "--flwr"]) == 0
    flwr_file = tmp_path / "run.toml"
    flwr_file.write_text(capsys.readouterr().out)
    assert parse_config_args([str(flwr_file)]) == Settings.build("demo", {"federation.rounds": 3}).to_run_config()
    assert main(["settings", "--profile", "demo", "--set", "train.epochs=4"]) == 0
    settings_file = tmp_path / "settings.toml"
    settings_file.write_text(capsys.readouterr().out)
    assert load_settings(settings_file) == Settings.build("demo", {"train.epochs": 4})


def test_an_unknown_or_invalid_key_is_named_by_its_dotted_key():
    with pytest.raises(SettingsError) as e:
        Settings.from_run_config({"federation.round": 3, "train.lr": "fast"})
    assert e.value.keys == ["federation.round", "train.lr"]
    assert "federation.round: Extra inputs are not permitted" in str(e.value)
    with pytest.raises(SettingsError, match="unknown settings profile 'dem'"):
        Settings.build("dem")


def test_the_demo_profile_is_todays_demo_and_the_defaults_are_for_real_use():
    """The demo profile reproduces the settings `make demo` ran with before there was one settings model."""
    demo = Settings.build("demo")
    assert (demo.model.arch, demo.model.weights, demo.preprocess.image_size, demo.preprocess.channels,
            demo.preprocess.denoise_sigma) == ("smallcnn", "none", 64, 1, 0.5)
    assert (demo.train.batch_size, demo.train.lr, demo.train.weight_decay, demo.train.seed) == (16, 1e-3, 1e-5, 42)
    f = demo.federation
    assert (f.rounds, f.local_epochs, f.strategy, f.partition_method, f.server_val_fraction) == (8, 2, "fedavg",
                                                                                                "iid", 0.5)
    assert demo.data.findings == SYNTH_FINDINGS and demo.data.path == "data/synth"
    real = Settings()
    assert (real.model.arch, real.model.weights, real.preprocess.image_size, real.preprocess.channels) == (
        "resnet50", "imagenet", 224, 3)
    assert real.data.findings is None and real.data.source == "auto"   # what the data has, detected


def test_a_settings_file_picks_its_profile_and_command_flags_win(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('profile = "demo"\n[model]\narch = "resnet18"\n[federation]\nrounds = 2\n')
    s = load_settings(f, {"federation.rounds": 5})
    assert (s.profile, s.model.arch, s.preprocess.image_size, s.federation.rounds) == ("demo", "resnet18", 64, 5)
    assert load_settings(f, profile="").preprocess.image_size == 224


def test_a_centralised_and_a_federated_run_from_one_settings_file_build_the_same_model(synth_root, tmp_path,
                                                                                      capsys):
    """`fedxray train --config F` and `fedxray federate --config F`: their bundles' model.json agree on every
    preprocessing and model key, because both read the same sections."""
    from fedxray.cli import main

    f = tmp_path / "settings.toml"
    f.write_text('profile = "demo"\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in TINY.items())
                 + '"train.epochs" = 1\n"federation.rounds" = 1\n"data.max_samples" = 24\n'
                 + f'"data.path" = "{synth_root}"\n')
    assert main(["train", "--config", str(f), "--out", str(tmp_path / "central"), "--quiet",
                 "--set", f"data.path={synth_root / 'hospital_1'}"]) == 0
    assert main(["federate", "--config", str(f), "--out", str(tmp_path / "fed"), "--quiet"]) == 0
    capsys.readouterr()
    cards = [json.loads((tmp_path / d / "bundle" / "model.json").read_text()) for d in ("central", "fed")]
    assert cards[0]["preprocess"] == cards[1]["preprocess"] == Settings.build("demo", TINY).preprocess.model_dump()
    assert cards[0]["architecture"] == cards[1]["architecture"]
    assert cards[0]["architecture"]["arch"] == "smallcnn" and cards[0]["preprocess"]["image_size"] == 32
    assert cards[0]["findings"] == cards[1]["findings"] == SYNTH_FINDINGS
