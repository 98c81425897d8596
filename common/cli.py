"""common/'s subcommands (`fedxray data synth|check`, `fedxray train`, `fedxray pretrain`, `fedxray settings`) and
the settings arguments every run command shares: `--config FILE --profile NAME --set KEY=VALUE --data --out --quiet`.

Every run command resolves its settings the same way (common/settings.py): the profile ('' = the real-use
defaults, `demo` = the embedded demo), then the command's own defaults, then the file, then --data/--out, then
each --set, so one settings file gives `train`, `federate`, `launch` and `flwr run` the same model and images.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_settings_arguments(p: argparse.ArgumentParser, *, data_help: str = "data path (data.path)",
                           profile: str | None = None) -> None:
    """`profile`: the command's default profile (None: the settings file's own, else the real-use defaults)."""
    from common.settings import PROFILES

    p.add_argument("--config", default=None, metavar="FILE",
                   help="settings TOML with [data] [preprocess] [model] [train] [federation] ... tables")
    p.add_argument("--profile", default=profile, choices=["", *PROFILES],
                   help="base settings: '' = real-use defaults (ResNet50, 224 px, ImageNet weights), demo = the "
                        "embedded synthetic demo" + (f" (default: {profile})" if profile else ""))
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument("--out", default=None, help="run folder (output_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting by its dotted key, e.g. --set train.epochs=3 --set model.arch=resnet18")
    p.add_argument("--quiet", action="store_true", help="no progress output, only the result")


def settings_from_args(a: argparse.Namespace, *defaults: dict):
    """The run's Settings from the shared arguments; `defaults`: the command's own layers, under the file."""
    from common.settings import load_settings, parse_overrides

    flags = {k: v for k, v in (("data.path", a.data), ("output_dir", a.out)) if v is not None}
    return load_settings(a.config, {**flags, **parse_overrides(a.set)}, profile=a.profile, defaults=defaults)


def add_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="synthetic hospitals and data checks")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("synth", help="write synthetic hospitals in the ChestX-ray14 layout")
    s.add_argument("--out", required=True)
    s.add_argument("--hospitals", type=int, default=3)
    s.add_argument("--patients", type=int, default=60, help="patients per hospital (1-3 images each)")
    s.add_argument("--size", type=int, default=128, help="image side in pixels")
    s.add_argument("--prevalence", type=float, default=0.25, help="base prevalence of each finding")
    s.add_argument("--holdout-patients", type=int, default=None, help="server-side held-out set (default: --patients)")
    s.add_argument("--bad-images", type=int, default=0, help="plant N corrupt/low-res files per hospital")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)

    c = dsub.add_parser("check", help="validate a data folder and print its data report")
    c.add_argument("path")
    c.add_argument("--config", default=None, metavar="FILE", help="settings TOML whose [data] table applies")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="data settings, e.g. --set data.findings=Pneumonia --set data.source=folder")
    c.add_argument("--json", default=None, help="also write the report as JSON here")
    c.set_defaults(func=_cmd_check)

    t = sub.add_parser("train", help="centralised training -> run directory with metrics, plots and a bundle")
    add_settings_arguments(t)
    t.add_argument("--compare-paper", action="store_true",
                   help="add the seed paper's reported figures under the results (ChestX-ray14 only)")
    t.set_defaults(func=_cmd_train)

    pt = sub.add_parser("pretrain", help="non-private training on data you declare public -> a warm-start bundle "
                                         "(model.weights=<its bundle>; DP fine-tuning starts from it)")
    add_settings_arguments(pt, data_help="the PUBLIC data (data.path); never a hospital's private data")
    pt.add_argument("--public", required=True, metavar="STATEMENT",
                    help="why this data is public (name, licence, where it is published), recorded in the warm "
                         "start's card and in every bundle trained from it, e.g. 'MedMNIST v2 PneumoniaMNIST, CC BY 4.0'")
    pt.set_defaults(func=_cmd_pretrain)

    st = sub.add_parser("settings", help="print the resolved settings as TOML (a settings file), or as Flower's run "
                                         "config (--flwr: lists and unset values as strings)")
    add_settings_arguments(st)
    st.add_argument("--flwr", action="store_true",
                    help="Flower's run config (`flwr run . --run-config FILE` takes it as it is)")
    st.set_defaults(func=_cmd_settings)


def _cmd_synth(a) -> int:
    from common.data.synthetic import synthesize

    written = synthesize(a.out, hospitals=a.hospitals, patients=a.patients, size=a.size, seed=a.seed,
                         holdout_patients=a.holdout_patients, prevalence=a.prevalence, bad_images=a.bad_images)
    for name, n in written.items():
        print(f"{Path(a.out) / name}: {n} images")
    return 0


def _cmd_check(a) -> int:
    from common.data.prepare import prepare_data
    from common.data.report import format_report
    from common.settings import Settings, parse_overrides, read_settings_file

    raw = read_settings_file(a.config) if a.config else {}
    # the check decodes every image; a tiny resize keeps it cheap
    cfg = Settings.build("", {"data": raw.get("data", {})}, {"data.path": a.path, "preprocess.image_size": 32,
                                                             "preprocess.denoise_sigma": 0}, parse_overrides(a.set))
    report = prepare_data(cfg).report()
    print(format_report(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


def _cmd_train(a) -> int:
    from common.centralised import run_centralised

    cfg = settings_from_args(a)
    summary = run_centralised(cfg, progress=not a.quiet, compare_paper=a.compare_paper)
    print(summary["table"])
    print(f"\nrun directory: {cfg.output_dir}\nbundle: {summary['bundle']}")
    return 0


def _cmd_pretrain(a) -> int:
    from common.centralised import run_centralised

    statement = a.public.strip()
    if len(statement) < 8:
        raise SystemExit("error: --public needs a statement of why the data is public (its name, licence or where "
                         "it is published), not an empty word")
    # the GroupNorm network by default: DP-SGD needs it, and a federation with DP builds it whatever it is given
    cfg = settings_from_args(a, {"model.dp_compatible": True})
    summary = run_centralised(cfg, progress=not a.quiet, public=statement)
    print(summary["table"])
    print(f"\nwarm start: {summary['bundle']}\nuse it with --set model.weights={summary['bundle']} (DP: "
          "privacy.trainable=auto then trains the normalisation layers and the head)")
    return 0


def _cmd_settings(a) -> int:
    import tomli_w

    from common.settings import nest

    s = settings_from_args(a)
    print(tomli_w.dumps(nest(s.to_run_config()) if a.flwr else _toml_ready(s.model_dump(mode="json"))), end="")
    return 0


def _toml_ready(d: dict) -> dict:
    """TOML has no null: an unset optional setting is written "" (which reads back as unset)."""
    return {k: _toml_ready(v) if isinstance(v, dict) else "" if v is None else v for k, v in d.items()}
