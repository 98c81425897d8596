// fedxray web page: upload one X-ray, show the findings table and a heatmap per finding (no dependencies).
"use strict";
const $ = (id) => document.getElementById(id);
const state = { result: null, shown: null };

function headers() {
  const key = sessionStorage.getItem("fedxray-api-key");
  return key ? { "X-API-Key": key } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// What a refusal means, in words; the server's detail follows (what was seen, what to do).
const REASONS = {
  not_grayscale: "Not an X-ray: this is a colour image",
  near_constant: "Not an X-ray: the image is blank",
  extreme_aspect_ratio: "Not a whole chest film: the image is a thin strip",
  inverted: "The image looks inverted (negative)",
  lateral_view: "Lateral view",
  out_of_distribution: "This does not look like the chest X-rays the model knows",
  upload_too_large: "The file is too large",
  too_many_pixels: "The image has too many pixels",
  too_small: "The image is too small",
  multi_frame: "The file holds several images",
  not_an_image: "Not an image this service reads",
  corrupt: "The file is damaged",
  empty: "The file is empty",
  dicom_unsupported: "This DICOM cannot be read here",
  dicom_no_pixels: "This DICOM holds no image",
  unsupported_media_type: "Unsupported file type",
  overloaded: "The server is busy",
  not_ready: "The model is not loaded yet",
};

async function errorText(resp) {
  let body;
  try { body = await resp.json(); } catch { return resp.statusText; }
  const detail = typeof body.detail === "string" ? body.detail : resp.statusText;
  const reason = REASONS[body.code];
  const retry = resp.headers.get("Retry-After");
  return (reason ? `${reason}. ` : "") + detail + (retry ? ` (try again in ${retry} s)` : "");
}

async function loadModel() {
  const resp = await fetch("/v1/model", { headers: headers() });
  if (resp.status === 401) { $("key-row").hidden = false; $("model-info").textContent = "This server needs an API key."; return; }
  if (!resp.ok) { $("model-info").textContent = "Model not available: " + (await errorText(resp)); return; }
  const card = await resp.json();
  $("model-info").textContent = `Model ${card.model_id} · ${card.architecture.arch || ""} · ` +
    `${card.findings.length} findings · input ${card.preprocess.image_size} px`;
}

function showImage(finding) {
  const r = state.result;
  state.shown = finding;
  const ex = finding && (r.explanations || []).find((e) => e.finding === finding);
  if (ex) {
    $("view").src = "data:image/png;base64," + ex.overlay_png_base64;
    $("view").alt = `heatmap of ${finding} over the X-ray`;
    $("caption").textContent = `Heatmap: ${finding} · peak at (${ex.peak.x.toFixed(0)}, ${ex.peak.y.toFixed(0)}) px`;
  } else {
    $("view").src = "data:image/png;base64," + r.preview_png_base64;
    $("view").alt = "uploaded X-ray";
    $("caption").textContent = `Original image · ${r.image.width}×${r.image.height} ${r.image.format}`;
  }
  for (const b of document.querySelectorAll("button.toggle")) {
    b.setAttribute("aria-pressed", String(b.dataset.finding === finding));
  }
}

function render(r) {
  state.result = r;
  const body = $("findings").tBodies[0];
  body.replaceChildren();
  for (const f of r.findings) {
    const tr = document.createElement("tr");
    tr.dataset.finding = f.finding;
    const pct = (100 * f.probability).toFixed(1);
    const cells = [0, 1, 2, 3, 4].map(() => tr.appendChild(document.createElement("td")));
    cells[0].textContent = f.finding;
    const bar = cells[1].appendChild(document.createElement("span"));
    bar.className = "bar";
    const fill = bar.appendChild(document.createElement("i"));
    fill.style.width = `${pct}%`;  // CSSOM, not a style attribute: allowed by the page's CSP
    const mark = bar.appendChild(document.createElement("b"));
    mark.style.left = `${(100 * f.threshold).toFixed(1)}%`;
    cells[1].appendChild(document.createTextNode(`${pct}%`));
    cells[2].textContent = `${(100 * f.threshold).toFixed(1)}%`;
    cells[3].className = `call ${f.positive ? "pos" : "neg"}`;
    cells[3].textContent = f.positive ? "positive" : "negative";
    const b = document.createElement("button");
    b.className = "toggle"; b.type = "button"; b.dataset.finding = f.finding;
    b.setAttribute("aria-pressed", "false"); b.textContent = "show";
    b.addEventListener("click", () => showImage(state.shown === f.finding ? null : f.finding));
    cells[4].appendChild(b);
    body.appendChild(tr);
  }
  const warnings = r.warnings || [];
  $("warning-list").replaceChildren(...warnings.map((w) => {
    const li = document.createElement("li"); li.textContent = w; return li;
  }));
  $("warnings").hidden = warnings.length === 0;  // shown right above the findings it qualifies
  $("timing").textContent = `${r.model.model_id} · ${r.timing.total_ms.toFixed(0)} ms on the server ` +
    `(inference ${r.timing.inference_ms.toFixed(0)} ms, heatmaps ${r.timing.explain_ms.toFixed(0)} ms)`;
  $("result").hidden = false;
  showImage(r.positive_findings.length ? r.positive_findings[0] : null);
}

async function upload(file) {
  if (!file) return;
  setStatus(`Analysing ${file.name}…`);
  $("result").hidden = true;  // never show the previous image's findings next to a new file
  const form = new FormData();
  form.append("file", file);
  try {
    const resp = await fetch("/v1/predict?findings=all&preview=true", { method: "POST", body: form, headers: headers() });
    if (resp.status === 401) { $("key-row").hidden = false; setStatus("Enter the API key, then choose the file again.", true); return; }
    if (!resp.ok) { setStatus(`Rejected (${resp.status}): ${await errorText(resp)}`, true); return; }
    render(await resp.json());
    setStatus(`Done: ${file.name}`);
  } catch (e) {
    setStatus("Request failed: " + e, true);
  }
}

$("file").addEventListener("change", (e) => { upload(e.target.files[0]); e.target.value = ""; });
$("api-key").addEventListener("change", (e) => { sessionStorage.setItem("fedxray-api-key", e.target.value); loadModel(); });
const drop = $("drop");
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (e) => upload(e.dataTransfer.files[0]));
loadModel();
