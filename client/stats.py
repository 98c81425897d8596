"""A hospital's data statistics for `job = "stats"` (server/jobs.py): aggregate counts only, small ones suppressed.

What leaves, per split of the hospital's own patient-level split (client/data.py `load_node_data`, the split
training uses): images, patients, positives per finding, the view mix (frontal / lateral / unknown, from the
image header or the label CSV) and the shorter side of the original images in bins (SIZE_BINS); and over the
whole node the images the data layer excluded, by their fixed category (ImageError codes such as `corrupt`,
`too_small`). Nothing per patient or per image, no file name, no path, no free text.

Small-count suppression: every count below the hospital's threshold k (site policy `[disclosure] min-count`,
client/policy.py; DEFAULT_MIN_COUNT without a policy), zero included, leaves as SUPPRESSED. A MetricRecord
holds numbers only, and the hospital boundary (client/boundary.py) withholds any reply whose config records
carry text, so "<k" travels as SUPPRESSED with k itself under MIN_COUNT_KEY; the server renders it as "<k"
(`render_count`). Keys: `<split>/images`, `<split>/patients`, `<split>/positive/<finding>`,
`<split>/view/<view>`, `<split>/size/<bin>`, `excluded/<code>`, `excluded/total`.
"""
from __future__ import annotations

import re

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.data import load_node_data
from client.policy import SitePolicy
from common.data.splits import SPLITS
from common.settings import Settings

SUPPRESSED = -1                 # a count below k (0 included): rendered "<k" by the server
MIN_COUNT_KEY = "min-count"     # the k the hospital applied
VIEWS = ("frontal", "lateral", "unknown")
FRONTAL, LATERAL = {"PA", "AP", "AP SUPINE", "FRONTAL"}, {"LATERAL", "LL", "RL", "LAT"}
SIZE_BINS = ((0, 256, "<256"), (256, 512, "256-511"), (512, 1024, "512-1023"), (1024, 2048, "1024-2047"),
             (2048, None, ">=2048"))   # shorter side of the original image, pixels
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def view_class(view: str | None) -> str:
    v = str(view or "").strip().upper()
    return "frontal" if v in FRONTAL else "lateral" if v in LATERAL else "unknown"


def size_bin(shorter: int | float | None) -> str | None:
    if shorter is None:
        return None
    return next(name for lo, hi, name in SIZE_BINS if shorter >= lo and (hi is None or shorter < hi))


def raw_counts(data) -> dict[str, int]:
    """The node's unsuppressed counts (NodeData from load_node_data); they never leave as they are."""
    out: dict[str, int] = {}
    manifest = None
    for split in SPLITS:
        ds = data.datasets.get(split)
        if ds is None:
            continue
        manifest = ds.manifest
        out[f"{split}/images"] = len(ds)
        out[f"{split}/patients"] = len({ds.manifest.samples[i].group for i in ds.indices})
        positives = (np.asarray(ds.labels) * np.asarray(ds.mask)).sum(axis=0) if len(ds) else np.zeros(len(data.findings))
        for j, finding in enumerate(data.findings):
            out[f"{split}/positive/{finding}"] = int(round(float(positives[j])))
        views = {v: 0 for v in VIEWS}
        sizes = {name: 0 for _, _, name in SIZE_BINS}
        for pos in range(len(ds)):
            facts = ds.decode_facts(pos)
            views[view_class(facts.get("view"))] += 1
            w, h = facts.get("width"), facts.get("height")
            b = size_bin(min(w, h) if w and h else None)
            if b is not None:
                sizes[b] += 1
        out.update({f"{split}/view/{v}": n for v, n in views.items()})
        out.update({f"{split}/size/{b}": n for b, n in sizes.items()})
    excluded = list(manifest.excluded) if manifest is not None else []
    for e in excluded:
        code = e.code if _CODE.match(str(e.code)) else "other"
        out[f"excluded/{code}"] = out.get(f"excluded/{code}", 0) + 1
    out["excluded/total"] = len(excluded)
    return out


def suppress(counts: dict[str, int], k: int) -> dict[str, int]:
    """Every count below k (0 included) becomes SUPPRESSED."""
    return {key: (n if n >= k else SUPPRESSED) for key, n in counts.items()}


def render_count(value, k: int) -> int | str:
    """What the server shows: the count, or "<k" for a suppressed one."""
    return f"<{k}" if value is None or int(value) == SUPPRESSED else int(value)


def stats_reply(msg: Message, context: Context, overrides: dict | None = None) -> Message:
    """The `query.stats` handler: this node's split as training makes it, counted, suppressed below k."""
    policy = SitePolicy.for_node(dict(context.node_config))   # an invalid policy refuses (boundary: site-policy)
    settings = Settings.from_run_config(context.run_config, overrides)
    config = msg.content["config"] if msg.has_content() and "config" in msg.content.config_records else ConfigRecord()
    findings = list(config["findings"]) if "findings" in config else None
    data = load_node_data(dict(context.node_config), settings, findings)
    k = SitePolicy.min_count_of(policy)
    counts = suppress(raw_counts(data), k)
    return Message(content=RecordDict({"stats": MetricRecord({MIN_COUNT_KEY: k, **counts}),
                                       "node": ConfigRecord({"site": data.site})}), reply_to=msg)
