"""The hospital boundary: what a ClientApp may say to the federation when something goes wrong.

Flower forwards a ClientApp's exception text to the server (`"<class 'DataError'>:<'<the CSV's path>:<line>:
… <image name, whose first 8 digits are the patient id> …'>"`), where it lands in the SuperLink's database, the
server's log and every file the ServerApp writes. So `boundary_mod`, the outermost mod of our ClientApp, catches every exception and replies
with a fixed vocabulary instead (common/errors.py FAILURES): a code, the exception's type, the setting to
check, the site name and an incident id. The detail (message, traceback, the file and line) goes only to the
hospital's own log: the SuperNode's output and, when the node config names one, `log-file`; the incident id
ties the two together.

The mod also checks what leaves on the way out: an Error reason that is not in this vocabulary, or a text
value in a reply other than the site name, is replaced by an `internal` failure (logged locally).

Reason format: `fedxray-error {"code": ..., "type": ..., "check": ..., "site": ..., "incident": ...,
"detail": {...}}`; `detail` holds numbers, booleans and identifier-like names only (a refusal's rule and the
limits involved). `parse_reply_error` reads it on the server.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
from pathlib import Path
from typing import Any

from client.site import safe_site
from common.errors import FAILURES, FedxrayError, SettingsError

PREFIX = "fedxray-error "
DECLINES = ("dp-budget-spent", "policy-refused")   # refusals by choice: recorded, not failures
FAILED, REFUSED = 1, 6                              # flwr ErrorCode CLIENT_APP_RAISED_EXCEPTION, MOD_FAILED_PRECONDITION
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.:+-]{0,63}$")   # site names, rule names, setting keys, type names
log = logging.getLogger("fedxray.hospital")


def _plain(value: Any) -> Any:
    """A detail value that may leave: numbers, booleans, None, identifier-like names; anything else raises."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str) and _NAME.match(value):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return list(value)
    raise ValueError(f"not a plain value: {type(value).__name__}")


def reason(code: str, *, site: str, exc_type: str = "", keys: list[str] = (), incident: str = "",
           detail: dict | None = None) -> str:
    """A reply-error reason in the fixed vocabulary: what to check is FAILURES' text for the code, plus the
    setting names in `keys` (identifier-like only). Raises ValueError on a code outside the vocabulary."""
    if code not in FAILURES:
        raise ValueError(f"unknown failure code {code!r}")
    if exc_type and not _NAME.match(exc_type):
        exc_type = "Exception"
    names = [k for k in keys if _NAME.match(k)]
    check = FAILURES[code][1] + (f": {', '.join(names)}" if names else "")
    info = {"code": code, "type": exc_type, "check": check, "site": safe_site(site),
            "incident": incident, "detail": {k: _plain(v) for k, v in (detail or {}).items() if _NAME.match(k)}}
    return PREFIX + json.dumps(info, sort_keys=True)


def parse_reply_error(text: str | None) -> dict | None:
    """The fields of a reason written by `reason`, else None (Flower's own errors, older apps)."""
    if not text or not text.startswith(PREFIX):
        return None
    try:
        info = json.loads(text[len(PREFIX):])
    except ValueError:
        return None
    return info if isinstance(info, dict) and info.get("code") in FAILURES else None


def is_decline(text: str | None) -> bool:
    info = parse_reply_error(text)
    return info is not None and info["code"] in DECLINES


def describe(info: dict) -> str:
    """One line for the server's log and history: `data-missing-images (DataError): images listed … ; check …`."""
    what = FAILURES[info["code"]][0]
    typ = f" ({info['type']})" if info.get("type") else ""
    detail = ", ".join(f"{k}={v}" for k, v in (info.get("detail") or {}).items())
    inc = f"; incident {info['incident']} in the hospital's log" if info.get("incident") else ""
    return f"{info['code']}{typ}: {what}; check {info['check']}{f' [{detail}]' if detail else ''}{inc}"


# ------------------------------------------------------------------------------------------ local log
_FILE_HANDLERS: dict[str, logging.Handler] = {}


def hospital_log(node_config: dict) -> logging.Logger:
    """The hospital's own log: stderr of the ClientApp (the SuperNode's output) and node config `log-file`."""
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in log.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s fedxray-node %(levelname)s %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    path = str(node_config.get("log-file") or "")
    if path and path not in _FILE_HANDLERS:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        Path(path).chmod(0o600)
        _FILE_HANDLERS[path] = fh
        log.addHandler(fh)
    return log


def failure_code(exc: BaseException) -> tuple[str, list[str]]:
    """(code, setting names to check) for an exception; the exception's text is never part of either."""
    if isinstance(exc, SettingsError):
        return "run-config", exc.keys
    if isinstance(exc, FedxrayError):
        return exc.failure, []
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
        return "out-of-memory", []
    return "internal", []


def _leak(reply) -> str | None:
    """Why a reply must not leave as it is, or None: an Error reason outside the vocabulary, or a text value
    in any ConfigRecord other than an empty one or a plain `site` name (metrics are numbers by construction)."""
    if reply.has_error():
        return None if parse_reply_error(reply.error.reason) else "an Error reason outside the vocabulary"
    if not reply.has_content():
        return None
    for name, record in reply.content.config_records.items():
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, str) and v and not (key == "site" and safe_site(v) == v) for v in values):
                return f"a text value in ConfigRecord {name!r}, key {key!r}"
    return None


def make_boundary_mod(overrides: dict | None = None):
    """The Flower mod to put first in the ClientApp's mods; `overrides` as in client.app.make_client_app."""
    from flwr.app import Error, Message

    def boundary_mod(msg, ctx, call_next):
        node_log = hospital_log(dict(ctx.node_config or {}))
        try:
            reply = call_next(msg, ctx)
        except Exception as exc:  # noqa: BLE001 - the boundary: nothing may escape as text
            incident = secrets.token_hex(4)
            code, keys = failure_code(exc)
            node_log.error("incident %s: %s message of run %s failed (%s): %s", incident,
                           msg.metadata.message_type, ctx.run_id, code, exc, exc_info=exc)
            return Message(Error(FAILED, reason(code, site=_node_site(ctx, overrides), exc_type=type(exc).__name__,
                                                keys=keys, incident=incident)), reply_to=msg)
        problem = _leak(reply)
        if problem is None:
            return reply
        incident = secrets.token_hex(4)
        node_log.error("incident %s: reply withheld, it held %s: %r", incident, problem,
                       reply.error.reason if reply.has_error() else None)
        return Message(Error(FAILED, reason("internal", site=_node_site(ctx, overrides), exc_type="ReplyWithheld",
                                            incident=incident)), reply_to=msg)

    return boundary_mod


def _node_site(ctx, overrides: dict | None) -> str:
    """client.data.node_site, imported only when a reply fails (data preparation is heavy to import)."""
    try:
        from client.data import node_site
    except Exception:  # noqa: BLE001 - the failure being reported may be this very import
        return "unknown"
    return node_site(ctx, overrides)
