"""common.explain and explain-eval: the one-pass CAM equals pytorch-grad-cam's GradCAM, overlays keep the
prediction's geometry, and the pointing game / IoU scores are right."""
from __future__ import annotations

import json
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

from common.bundle import load_bundle, read_card, sha256_file
from common.settings import ModelConfig
from common.data.manifest import Box
from common.explain import (CAM_METHODS, explain_batch, fit_within, forward_with_cams, jet, normalise_cams, peak_xy,
                            render_overlay, render_overlays)
from common.models import build_model
from inference_api.explain_eval import box_mask, evaluate_explanations, heat_iou, pointing_hit
from tests.inference_support import trained_bundle

# Fast CAM vs pytorch-grad-cam GradCAM (ClassifierOutputTarget on raw logits), same normalisation:
# measured max abs differences are 2e-7 .. 5e-6 (float32 rounding of the gradient mean); 1e-4 leaves margin.
TOLERANCE = 1e-4


def _model(arch: str, n: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch=arch, weights="none"), n)
    m.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the maps are not degenerate
        m(torch.randn(8, 3, 64, 64))
    return m.eval()


@pytest.mark.parametrize("arch,size", [("smallcnn", 64), ("resnet18", 96), ("resnet50", 96)])  # 4x4, 3x3, 3x3 maps
def test_fast_cam_equals_pytorch_grad_cam(arch, size):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from common.models import cam_target_layer

    model = _model(arch)
    x = torch.randn(2, 3, size, size)
    fast = explain_batch(model, x)
    assert fast.maps.shape == (2, 4, size, size) and fast.targets == [0, 1, 2, 3]
    with GradCAM(model=model, target_layers=[cam_target_layer(model)]) as cam:
        for c in range(4):
            ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * 2)
            diff = np.abs(fast.maps[:, c].numpy() - ref).max()
            assert diff < TOLERANCE, f"{arch} finding {c}: max abs diff {diff:.2e}"
    assert fast.maps.amax() > 0.99 and fast.maps.amin() >= 0  # real maps, not all-zero ones that match trivially
    with torch.no_grad():
        assert torch.allclose(fast.logits, model(x), atol=1e-5)  # the same pass made the prediction


def test_explain_batch_with_grad_cam_family_methods():
    model = _model("smallcnn")
    x = torch.randn(1, 3, 32, 32)
    for method in ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "scorecam"):
        ex = explain_batch(model, x, method=method, targets=[2, 0], size=(40, 50))
        assert ex.maps.shape == (1, 2, 40, 50) and ex.targets == [2, 0], method
        assert float(ex.maps.min()) >= 0 and float(ex.maps.max()) <= 1 + 1e-6, method
    assert all(p.grad is None for p in model.parameters())  # pytorch-grad-cam's gradients are cleared
    with pytest.raises(ValueError, match="unknown CAM method 'nope'.*gradcam\\+\\+"):
        explain_batch(model, x, method="nope")
    assert CAM_METHODS[0] == "fast"


def test_normalisation_order_matches_pytorch_grad_cam_scaling():
    from pytorch_grad_cam.utils.image import scale_cam_image

    raw = torch.rand(3, 7, 7) * 5
    ref = scale_cam_image(scale_cam_image(raw.numpy(), (224, 224)))  # per layer, then the aggregation step
    assert np.abs(normalise_cams(raw, (224, 224)).numpy() - ref).max() < 1e-5


def test_forward_with_cams_is_relu_of_weighted_activations():
    model = _model("smallcnn")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, cams = forward_with_cams(model, x)
        feats = model.features(x)
    w = model.fc.weight
    expected = torch.relu(torch.einsum("fk,bkhw->bfhw", w, feats))
    assert torch.allclose(cams, expected, atol=1e-5) and cams.shape == (2, 4, 4, 4)
    # the CAM's spatial mean is exactly the logit without bias, when nothing was clipped by the ReLU
    unclipped = torch.einsum("fk,bkhw->bfhw", w, feats).mean((-2, -1)) + model.fc.bias
    assert torch.allclose(unclipped, logits, atol=1e-5)


def test_peak_maps_back_to_original_pixels():
    cam = torch.zeros(8, 8)
    cam[2, 5] = 1.0  # cell (row 2, col 5) of an 8x8 map over a 160x80 (W x H) image
    ov = render_overlay(np.zeros((80, 160), np.float32), cam)
    assert (ov.width, ov.height) == (160, 80)
    assert abs(ov.peak_x - (5.5 * 160 / 8)) <= 1 and abs(ov.peak_y - (2.5 * 80 / 8)) <= 1
    img = Image.open(BytesIO(ov.png))
    assert img.size == (160, 80) and img.mode == "RGB"
    small = render_overlay(np.zeros((80, 160), np.float32), cam, max_side=40)  # scaled overlay, same peak
    assert (small.width, small.height) == (40, 20)
    assert abs(small.peak_x - ov.peak_x) <= 4 and abs(small.peak_y - ov.peak_y) <= 4
    assert peak_xy(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), 2, 2) == (1.0, 0.0)


def test_fit_within_and_colour_map():
    import matplotlib

    assert fit_within(1000, 500, 512) == (512, 256) and fit_within(100, 50, 512) == (100, 50)
    assert fit_within(100, 50, None) == (100, 50)
    mpl = matplotlib.colormaps["jet"](np.arange(256), bytes=True)[:, :3]      # uint8 (256, 3)
    levels = jet(np.arange(256) / 255)
    assert levels.dtype == np.uint8 and levels.shape == (256, 3) and np.array_equal(levels, mpl)
    lut = jet(np.array([0.0, 0.5, 1.0]))
    assert lut[0, 2] > 100 and lut[0, 0] == 0      # cold = blue
    assert lut[2, 0] > 100 and lut[2, 2] == 0      # hot = red


def test_overlay_pixels_are_matplotlib_jet_blended_by_heat():
    """The PNG the API sends, decoded: each pixel = gray + (heat x alpha) x (matplotlib jet(heat) - gray), gray and
    heat at their 8-bit levels."""
    import matplotlib

    gray = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(30, 40)
    cam = torch.arange(30 * 40, dtype=torch.float32).reshape(30, 40)        # every level from cold to hot
    ov = render_overlay(gray, cam, alpha=0.6)
    img = np.asarray(Image.open(BytesIO(ov.png)))
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8
    heat = normalise_cams(cam[None], (30, 40))[0].numpy()
    h8 = (np.clip(heat, 0, 1) * 255 + 0.5).astype(np.uint8)
    colour = matplotlib.colormaps["jet"](h8, bytes=True)[..., :3].astype(np.float32)
    g = ((gray * 255 + 0.5).astype(np.uint8)[..., None]).astype(np.float32)
    a = h8[..., None].astype(np.float32) * (0.6 / 255)
    assert np.array_equal(img, (g + a * (colour - g) + 0.5).astype(np.uint8))
    assert len(np.unique(h8)) == 256
    several = render_overlays(gray, torch.stack([cam, cam.flip(0)]), alpha=0.6)   # the batch renderer: the same
    assert several[0].png == ov.png and several[1].png == render_overlay(gray, cam.flip(0), alpha=0.6).png


def test_scores_pointing_game_and_iou():
    boxes = [Box("Nodule", 10, 20, 10, 10)]
    mask = box_mask(boxes, 50, 60)
    assert mask.sum() == 100 and mask[20, 10] and mask[29, 19] and not mask[30, 20]
    heat = np.zeros((50, 60), np.float32)
    heat[25, 15] = 1.0
    assert pointing_hit(heat, boxes)
    heat2 = np.zeros_like(heat)
    heat2[25, 22] = 1.0  # 2.5 px right of the box edge
    assert not pointing_hit(heat2, boxes) and pointing_hit(heat2, boxes, tolerance=3)
    assert heat_iou(mask.astype(np.float32), mask, 0.5) == 1.0
    half = np.zeros_like(heat)
    half[20:30, 10:15] = 1.0
    assert heat_iou(half, mask, 0.5) == pytest.approx(0.5)


def test_explain_eval_report_and_model_card(tmp_path_factory, tmp_path):
    from fedxray.cli import main
    from tests.inference_support import synthetic_data

    bundle_dir = trained_bundle(tmp_path_factory)
    data = synthetic_data()
    bundle = load_bundle(bundle_dir)
    report = evaluate_explanations(bundle, data, progress=False)
    assert report["images"] > 0 and set(report["per_finding"]) <= {"Cardiomegaly", "Effusion", "Nodule", "Pneumonia"}
    for r in report["per_finding"].values():
        assert 0 <= r["pointing_game"] <= r["pointing_game_standard"] <= 1 and 0 <= r["mean_iou"] <= 1
        assert 0 < r["pointing_game_chance"] < 1

    # the CLI prints, writes the JSON, and records it in model.json without breaking the weights hash
    weights_hash = sha256_file(bundle_dir / "weights.safetensors")
    out = tmp_path / "ee.json"
    assert main(["explain-eval", "--bundle", str(bundle_dir), "--data", str(data), "--out", str(out),
                 "--max-images", "20"]) == 0
    saved = json.loads(out.read_text())
    assert saved["method"] == "fast" and saved["images"] <= 20
    card = read_card(bundle_dir)
    assert card["extra"]["explanation_eval"]["per_finding"] == saved["per_finding"]
    # the card is public (/v1/model): the local report names the data folder, the card never does
    assert saved["data"] == str(data) and str(data) not in json.dumps(card["extra"]["explanation_eval"])
    assert "data" not in card["extra"]["explanation_eval"] and "skipped_images" in card["extra"]["explanation_eval"]
    reloaded = load_bundle(bundle_dir)  # verify=True: the sha256 still matches
    assert reloaded.model_id == bundle.model_id and sha256_file(bundle_dir / "weights.safetensors") == weights_hash


class _Rotate180(torch.nn.Module):
    def forward(self, x):
        return torch.flip(x, (-2, -1))


class _Brighter(torch.nn.Module):
    """+3: normalised pixels (black = -2.1) become positive, so a cell only partly on a small box still shows."""

    def forward(self, x):
        return x + 3


def _brightness_model(rotated: bool = False) -> torch.nn.Module:
    """A SmallCNN whose CAM of every finding is the image's brightness on a 16 x 16 grid (features = +3, then a
    4 x 4 average pool; head = the channels' mean): a model known to look at the bright part of an image.
    `rotated`: the same model looking at the point opposite (the map turned 180 degrees), i.e. at the wrong place."""
    from common.models import SmallCNN

    model = SmallCNN(4)
    model.features = torch.nn.Sequential(_Brighter(), torch.nn.AvgPool2d(4), *([_Rotate180()] if rotated else []))
    model.fc = torch.nn.Linear(3, 4)
    with torch.no_grad():
        model.fc.weight.fill_(1 / 3)
        model.fc.bias.zero_()
    return model.eval()


def _boxes_only(src, dst, pad_rows: int = 32):
    """A copy of a synthetic hospital (ChestX-ray14 layout) whose every boxed image is black with its first listed box
    white, that box alone in BBox_List_2017.csv, and `pad_rows` black rows below (not square: height and width
    cannot be swapped unnoticed). The right place to point at is then known without any learning."""
    import csv
    import shutil

    shutil.copytree(src, dst)
    rows = list(csv.reader((dst / "BBox_List_2017.csv").open()))
    first = {}
    for row in rows[1:]:
        first.setdefault(row[0], row)
    with open(dst / "BBox_List_2017.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([rows[0], *first.values()])
    for name, row in first.items():
        h, w = np.asarray(Image.open(dst / "images" / name)).shape
        x0, y0, bw, bh = (float(v) for v in row[2:6])
        img = np.zeros((h + pad_rows, w), np.uint8)
        img[round(y0):round(y0 + bh), round(x0):round(x0 + bw)] = 255
        Image.fromarray(img, mode="L").save(dst / "images" / name)
    return dst, {row[1] for row in first.values()}


# Measured on _boxes_only(the inference tests' synthetic hospital: 60 patients, seed 5): 74 boxed images, chance
# (the box's share of the image) 0.004 .. 0.061 per finding; the brightness model points 1.0 strict for every
# finding (mean IoU 0.84); the rotated one 0.0 strict, at most 0.13 with the standard tolerance (the heart box,
# near the middle). A margin of 0.5 over chance stays far from both.
BEATS_CHANCE_BY = 0.5


def test_pointing_game_beats_chance_for_a_model_that_looks_at_the_finding(tmp_path_factory, tmp_path):
    """explain-eval end to end (box list, image loading, preprocessing, CAM, resize to the original, peak, box test)
    on pictures where the right place is known: the model that looks there beats the chance level by a wide margin
    for every finding, the one that looks at the opposite point does not."""
    from dataclasses import replace

    from tests.inference_support import synthetic_data

    bundle = load_bundle(trained_bundle(tmp_path_factory))   # its findings, thresholds and preprocessing
    data, findings = _boxes_only(synthetic_data(), tmp_path / "boxes")
    right = evaluate_explanations(replace(bundle, model=_brightness_model()), data, progress=False)
    wrong = evaluate_explanations(replace(bundle, model=_brightness_model(rotated=True)), data, progress=False)
    assert set(right["per_finding"]) == findings and right["images"] > 50
    for name, r in right["per_finding"].items():
        chance = r["pointing_game_chance"]
        assert 0 < chance < 0.2 and r["images"] >= 5, (name, r)
        assert r["pointing_game"] >= chance + BEATS_CHANCE_BY, (name, r)
        assert r["pointing_game_standard"] >= r["pointing_game"]
        assert wrong["per_finding"][name]["pointing_game_standard"] < chance + BEATS_CHANCE_BY / 2, (name, wrong)
    assert right["overall"]["mean_iou"] > wrong["overall"]["mean_iou"] + 0.2


def test_explain_eval_refuses_source_without_boxes(tmp_path_factory, tmp_path):
    from common.errors import DataError
    from tests.inference_support import synthetic_data

    bundle = load_bundle(trained_bundle(tmp_path_factory))
    with pytest.raises(DataError, match="no image with a bounding box"):
        evaluate_explanations(bundle, synthetic_data(), split="no-such-split", progress=False)
