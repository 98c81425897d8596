"""The one training loop and the centralised run: losses, reproducibility, learning beats chance, run files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedxray.cli import main as cli_main
from common.settings import Settings, ModelConfig, TrainConfig, load_settings
from common.models import build_model
from common.centralised import run_centralised
from common.training import (SELECTION_RULES, MaskedBCELoss, SoftmaxCELoss, make_criterion, seed_everything,
                             selection_key, train_epoch)
from tests.conftest import SYNTH_FINDINGS


def test_masked_bce_ignores_unknown_labels_and_gives_per_sample_losses():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    full = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    assert torch.isclose(MaskedBCELoss()(logits, y, mask), (full[0, 0] + full[1, 0] + full[1, 1]) / 3)
    y2 = y.clone()
    y2[0, 1] = 1.0  # a masked label can change without changing the loss
    assert torch.isclose(MaskedBCELoss()(logits, y2, mask), MaskedBCELoss()(logits, y, mask))
    per = MaskedBCELoss(reduction="none")(logits, y, mask)
    assert per.shape == (2,) and torch.isclose(per[0], full[0, 0])


def test_pos_weight_from_training_labels_and_softmax_check():
    cfg = TrainConfig(pos_weight=True)
    crit = make_criterion(cfg, np.array([[1, 0], [0, 0], [0, 0], [0, 1]], np.float32))
    assert torch.allclose(crit.pos_weight, torch.tensor([3.0, 3.0]))
    with pytest.raises(ValueError, match="exactly one positive class"):
        SoftmaxCELoss()(torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))


def test_a_diverged_model_is_a_clear_error_naming_the_tensors_at_fault():
    from common.errors import ModelDiverged
    from common.training import predict

    loader = [(torch.randn(4, 1, 16, 16), torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.bool))]
    model = build_model(ModelConfig(arch="smallcnn", weights="none"), 2, 1)
    assert np.isfinite(predict(model, loader)[0]).all()
    with torch.no_grad():
        model.features[1][1].running_var[0] = -0.5    # what a server optimiser used to do to BatchNorm
    with pytest.raises(ModelDiverged, match=r"val: .*NaN/inf on 4 of 4 images.*negative BatchNorm running_var in "
                                            r"features\.1\.1\.running_var.*Lower train\.lr"):
        predict(model, loader, desc="val")
    model = build_model(ModelConfig(arch="smallcnn", weights="none"), 2, 1)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(ModelDiverged, match=r"NaN/inf in fc\.weight"):
        predict(model, loader)


# Test macro AUC of _config on the session's synth_root (3 hospitals x 40 patients, seed 1), measured: 0.905 with
# the default training seed (42), 0.854 / 0.924 with seeds 2 / 1; on other synthetic draws (data seeds 2, 3)
# 0.786 .. 0.861. Not learning (lr 1e-12): 0.431 here, 0.447 .. 0.485 elsewhere. 0.82 sits below every seed on
# this data and about 0.4 above a model that did not learn.
LEARNED_AUC = 0.82


def _config(root, out, **train):
    return Settings.model_validate({
        "data": {"path": str(root), "findings": SYNTH_FINDINGS},
        "preprocess": {"image_size": 48}, "model": {"arch": "smallcnn", "weights": "none"},
        "train": {"epochs": 6, "batch_size": 16, "lr": 3e-3, "early_stopping_patience": 0, **train},
        "output_dir": str(out)})


def test_training_is_reproducible_on_cpu():
    def run():
        seed_everything(5)
        model = build_model(ModelConfig(arch="smallcnn", weights="none"), 2)
        x, y = torch.randn(16, 3, 32, 32), (torch.rand(16, 2) > 0.5).float()
        loader = [(x[:8], y[:8], torch.ones(8, 2, dtype=torch.bool)), (x[8:], y[8:], torch.ones(8, 2, dtype=torch.bool))]
        train_epoch(model, loader, torch.optim.Adam(model.parameters()), MaskedBCELoss())
        return torch.cat([p.flatten() for p in model.parameters()])
    assert torch.equal(run(), run())


def test_centralised_run_learns_and_writes_its_run_directory(synth_root, tmp_path):
    """A tiny CNN trained for a few epochs reaches what this config measured on the held-out test split."""
    summary = run_centralised(_config(synth_root, tmp_path / "run"), progress=False)
    test = summary["test"]
    assert test["macro"]["auc"] >= LEARNED_AUC, test["macro"]
    assert len(summary["history"]) == 6 and 1 <= summary["best_epoch"] <= 6
    assert summary["validation"]["macro"]["f1"] == max(h["val_f1"] for h in summary["history"])
    for f in ("metrics.json", "data_report.json", "roc_test.png", "per_finding_test.png", "training_curves.png",
              "bundle/model.json", "bundle/weights.safetensors"):
        assert (tmp_path / "run" / f).is_file(), f
    card = json.loads((tmp_path / "run" / "bundle" / "model.json").read_text())
    assert card["provenance"]["training"] == "centralised"
    assert card["findings"] == SYNTH_FINDINGS and set(card["thresholds"]) == set(SYNTH_FINDINGS)
    assert card["metrics"]["test"]["headline"]["auc"] == pytest.approx(test["headline"]["auc"])
    header = summary["table"].splitlines()[1].split()
    assert header == ["Model", "Accuracy", "Precision", "Recall", "Specificity", "F1", "AUC", "ECE"]
    assert "all-positive baseline" in summary["table"] and "seed paper" not in summary["table"]
    # patient-level: no patient of the pooled hospitals in two splits
    rep = summary["data_report"]
    assert sum(s["images"] for s in rep["splits"].values()) == rep["images"]


def test_early_stopping(synth_root, tmp_path):
    summary = run_centralised(_config(synth_root, tmp_path / "r", epochs=30, lr=1e-7, early_stopping_patience=2,
                                      scheduler="none"), progress=False)
    assert summary["stopped_early"] and len(summary["history"]) < 30


def test_train_cli_config_file_overrides_and_clear_errors(synth_root, tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text(f'output_dir = "{tmp_path / "cli"}"\n[data]\npath = "{synth_root / "hospital_1"}"\n'
                    f'findings = {json.dumps(SYNTH_FINDINGS)}\n[preprocess]\nimage_size = 32\n'
                    '[model]\narch = "smallcnn"\nweights = "none"\n[train]\nepochs = 1\n')
    assert load_settings(toml, {"train.epochs": 2}).train.epochs == 2
    assert cli_main(["train", "--config", str(toml), "--set", "train.batch_size=8"]) == 0
    assert "bundle:" in capsys.readouterr().out
    assert cli_main(["train", "--data", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(toml), "--set", "train.epochs=0"]) == 2
    assert "invalid settings (train.epochs: Input should be greater than or equal to 1)" in capsys.readouterr().err


def test_train_device_auto_is_the_cpu_without_a_gpu_and_cuda_without_one_is_a_clear_error(monkeypatch):
    """train.device: auto picks a CUDA GPU only when torch sees one; demanding cuda without one names the
    setting and what to check instead of failing deep inside torch."""
    import torch

    from common.errors import FedxrayError
    from common.training import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(FedxrayError, match=r"train.device=cuda:1.*train.device=auto"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(Exception, match="train.device"):
        Settings.build("demo", {"train.device": "gpu"})


def test_pretrain_declares_public_data_and_every_model_trained_from_it_records_what_it_saw(synth_root, tmp_path,
                                                                                            capsys):
    """`fedxray pretrain` is centralised training with a public-data declaration; a run started from its bundle
    (model.weights=<bundle>) names it in its own card: model id, weights sha256, the declaration, the data seen."""
    toml = tmp_path / "c.toml"
    toml.write_text(f'[data]\npath = "{synth_root / "hospital_1"}"\nfindings = {json.dumps(SYNTH_FINDINGS)}\n'
                    '[preprocess]\nimage_size = 32\n[model]\narch = "smallcnn"\nweights = "none"\n[train]\nepochs = 1\n')
    with pytest.raises(SystemExit):   # the declaration is required
        cli_main(["pretrain", "--config", str(toml), "--out", str(tmp_path / "w")])
    capsys.readouterr()
    assert cli_main(["pretrain", "--config", str(toml), "--out", str(tmp_path / "w"), "--quiet",
                     "--public", "synthetic hospital 1, published with the tests"]) == 0
    assert f"--set model.weights={tmp_path / 'w' / 'bundle'}" in capsys.readouterr().out
    warm = json.loads((tmp_path / "w" / "bundle" / "model.json").read_text())
    assert warm["provenance"]["public_data"] == "synthetic hospital 1, published with the tests"
    assert warm["provenance"]["warm_start"] is None and len(warm["provenance"]["data"]["fingerprint"]) == 16
    assert warm["architecture"]["dp_compatible"] is True    # pretrain's default: the network DP-SGD trains

    assert cli_main(["train", "--config", str(toml), "--out", str(tmp_path / "t"), "--quiet",
                     "--data", str(synth_root / "hospital_2"), "--set", f"model.weights={tmp_path / 'w' / 'bundle'}",
                     "--set", "model.dp_compatible=true"]) == 0
    card = json.loads((tmp_path / "t" / "bundle" / "model.json").read_text())
    ws = card["provenance"]["warm_start"]
    assert ws["kind"] == "bundle" and ws["model_id"] == warm["model_id"]
    assert ws["weights_sha256"] == warm["weights"]["sha256"] and ws["public_data"] == warm["provenance"]["public_data"]
    assert ws["data"] == {k: v for k, v in warm["provenance"]["data"].items() if k != "root"}   # no path of theirs
    assert str(synth_root) not in json.dumps(ws) and "public_data" not in card["provenance"]


def test_cosine_lr_is_the_curve_centralised_training_follows():
    """federation.lr_schedule=cosine gives hospitals fit()'s CosineAnnealingLR curve over rounds x local epochs."""
    import torch

    from common.training import cosine_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=15)
    expected = []
    for _ in range(15):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [cosine_lr(3e-4, e, 15) for e in range(15)] == pytest.approx(expected, rel=1e-9)
    assert cosine_lr(3e-4, 99, 15) == pytest.approx(expected[-1])   # past the plan: the last epoch's rate



@pytest.mark.parametrize("select_on", ["val-f1", "val-auc"])
def test_fit_keeps_the_epoch_that_its_selection_rule_ranks_best(synth_root, tmp_path, select_on):
    """`train.select_on` decides which epoch is exported: each rule's pick over the recorded history. On this
    data the rules disagree (measured: validation F1 keeps epoch 5 of 6, AUC epoch 6), so an ignored rule fails."""
    summary = run_centralised(_config(synth_root, tmp_path / "r", select_on=select_on), progress=False)
    h = summary["history"]
    score = {"val-f1": lambda r: (r["val_f1"], r["val_auc"]), "val-auc": lambda r: (r["val_auc"], r["val_f1"])}
    assert summary["best_epoch"] == max(h, key=score[select_on])["epoch"], h
    card = json.loads((tmp_path / "r" / "bundle" / "model.json").read_text())
    assert card["provenance"]["config"]["train"]["select_on"] == select_on
    assert card["provenance"]["selection"] == f"{SELECTION_RULES[select_on]} (validation split)"
    cal = card["provenance"]["calibration"]   # train.calibration's default: the exported epoch Platt-scaled
    assert cal["method"] == "platt" and cal["val_nll"]["after"] <= cal["val_nll"]["before"], cal


def test_selection_rules_rank_by_their_own_figure_and_put_a_missing_one_last():
    """(F1, AUC, loss) of three epochs: each rule prefers a different one; None / NaN never wins."""
    epochs = {1: (0.9, 0.80, 0.50), 2: (0.8, 0.95, 0.40), 3: (0.7, 0.85, 0.30), 4: (None, None, float("nan"))}
    best = {rule: max(epochs, key=lambda e: selection_key(rule, *epochs[e])) for rule in SELECTION_RULES}
    assert best == {"val-f1": 1, "val-auc": 2, "val-loss": 3}
    assert selection_key("val-f1", 0.5, 0.9, 0.1) > selection_key("val-f1", 0.5, 0.8, 0.1)   # ties broken by AUC
    with pytest.raises(ValueError, match="unknown selection rule"):
        selection_key("val-acc", 0.5, 0.5, 0.5)
