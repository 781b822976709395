// The try-it page: plain DOM, no build step. Talks to /tasks (a rollout's figures too) and /classify only.
// Own labels (comma- or line-separated) go as the form field `labels`, a JSON array.
"use strict";

const $ = (id) => document.getElementById(id);
let tasks = {};
let lastImage = null; // the Blob shown, re-sent when the task or top-k changes

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadTasks() {
  const response = await fetch("/tasks");
  if (!response.ok) {
    setStatus(`Cannot list tasks (${response.status}); is the service ready? See /readyz.`, true);
    return;
  }
  const list = (await response.json()).tasks;
  tasks = Object.fromEntries(list.map((t) => [t.task, t]));
  const select = $("task");
  const previous = select.value || new URLSearchParams(location.search).get("task");
  select.replaceChildren(...list.map((t) => new Option(`${t.task} (${t.classes.length} classes)`, t.task)));
  if (previous && tasks[previous]) select.value = previous;
  if (!list.length) setStatus("No task is loaded: add a prompt set to the prompt directory.", true);
  showTask();
}

function showTask() {
  const t = tasks[$("task").value];
  if (!t) {
    $("task-info").textContent = "";
    $("samples-box").hidden = true;
    return;
  }
  const group = t.group ? `, group ${t.group}` : "";
  const shown = t.classes.length > 12 ? `${t.classes.slice(0, 12).join(", ")}, … (+${t.classes.length - 12} more)`
                                      : t.classes.join(", ");
  $("task-info").textContent = `${t.prompt_set} v${t.version} · ${t.method}${group} · classes: ${shown}`;
  $("task-info").title = t.classes.join(", ");
  $("task-card").textContent = cardText(t);
  showRollout(t);
  const samples = $("samples");
  samples.replaceChildren(...t.samples.map((url) => {
    const button = document.createElement("button");
    button.type = "button";
    button.title = url.split("/").pop();
    const img = document.createElement("img");
    img.src = url;
    img.alt = button.title;
    button.append(img);
    button.addEventListener("click", async () => classify(await (await fetch(url)).blob()));
    return button;
  }));
  $("samples-box").hidden = t.samples.length === 0;
}

// A task's rollout: its live and candidate versions, and the figures the engine counted (GET /tasks/{task}/rollout).
let rolloutTimer = null; // the figures are refreshed while a task with a rollout is shown

async function showRollout(t) {
  const box = $("task-rollout");
  clearTimeout(rolloutTimer);
  box.hidden = !t.rollout;
  if (!t.rollout) return;
  rolloutTimer = setTimeout(() => { if ($("task").value === t.task && !document.hidden) showRollout(t); }, 2000);
  const r = t.rollout;
  const head = `rollout: live ${t.prompt_set} v${t.version} · candidate ${r.candidate}` +
    (r.version ? ` v${r.version}` : "") + ` · ${r.mode} ${r.share}% · ${r.state}` + (r.note ? ` (${r.note})` : "");
  box.textContent = head;
  const response = await fetch(`/tasks/${encodeURIComponent(t.task)}/rollout`);
  if (!response.ok || $("task").value !== t.task) return;
  const s = await response.json();
  const score = (x) => (typeof x === "number" ? x.toFixed(3) : "n/a");
  const parts = s.answered.map((f) => `${f.role} v${f.version}: ${f.requests} requests, ` +
                                      `mean top-1 ${score(f.mean_top1_score)}`);
  if (s.shadow) {
    parts.push(`shadow: ${s.shadow.compared} compared, agreement ${score(s.shadow.agreement)}, mean top-1 ` +
               `${score(s.shadow.live_mean_top1_score)} live / ${score(s.shadow.candidate_mean_top1_score)} candidate`);
  }
  box.textContent = [head, ...parts].join(" · ");
}

function cardText(t) {
  const e = t.evaluation || {};
  const percent = (x) => (typeof x === "number" ? `${(100 * x).toFixed(1)}%` : "n/a");
  const parts = [];
  if (e.accuracy !== undefined) parts.push(`test accuracy ${percent(e.accuracy)} (zero-shot ${percent(e.zero_shot)})`);
  if (e.test_images !== undefined) parts.push(`${e.test_images} test images`);
  if (t.trained && t.trained.created) parts.push(`trained ${t.trained.created.slice(0, 10)}`);
  return parts.join(" · ");
}

function ownLabels() {
  return $("labels").value.split(/[,\n]/).map((s) => s.trim()).filter((s) => s);
}

function showImage(blob) {
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.onerror = () => { preview.hidden = true; $("drop-hint").hidden = false; }; // no broken preview
  preview.src = URL.createObjectURL(blob);
  preview.hidden = false;
  $("drop-hint").hidden = true;
}

function notAnImage(file) {
  $("results").replaceChildren();
  setStatus(`"${file.name}" is not an image (${file.type || "unknown type"}): choose a JPEG, PNG, WebP, BMP, GIF ` +
            "or TIFF file.", true);
}

async function classify(blob) {
  lastImage = blob;
  showImage(blob);
  const task = $("task").value;
  if (!task) return;
  const form = new FormData();
  form.append("file", blob, blob.name || "image");
  const labels = ownLabels();
  if (labels.length) form.append("labels", JSON.stringify(labels));
  setStatus("Classifying…");
  const started = performance.now();
  let response;
  try {
    const minScore = $("min-score").value.trim();
    const threshold = minScore ? `&min_score=${encodeURIComponent(minScore)}` : "";
    response = await fetch(`/classify?task=${encodeURIComponent(task)}&top_k=${$("topk").value}${threshold}`,
                           { method: "POST", body: form });
  } catch (e) {
    setStatus(`Network error: ${e}`, true);
    return;
  }
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) {
    $("results").replaceChildren();
    $("version").hidden = true;
    setStatus(`${response.status}: ${body.detail || body.error}`, true);
    return;
  }
  showPredictions(body, performance.now() - started);
  if (tasks[task] && tasks[task].rollout) showRollout(tasks[task]); // its figures moved
}

function showPredictions(body, ms) {
  $("version").textContent = `${body.prompt_set} v${body.version}`;
  $("version").hidden = false;
  const best = body.predictions.length ? (100 * body.predictions[0].score).toFixed(1) : "n/a";
  setStatus(body.abstained ? `${body.task} · not sure: abstained (best score ${best}% is below the minimum) · ` +
                             `${Math.round(ms)} ms` : `${body.task} · ${Math.round(ms)} ms`);
  $("status").classList.toggle("abstained", Boolean(body.abstained));
  $("results").classList.toggle("abstained", Boolean(body.abstained));
  $("results").replaceChildren(...body.predictions.map((p, i) => {
    const item = document.createElement("li");
    item.className = i === 0 ? "bar top" : "bar";
    const percent = (100 * p.score).toFixed(1);
    item.innerHTML = `<span class="label"></span><span class="track"><span class="fill"></span></span>
                      <span class="score"></span>`;
    item.querySelector(".label").textContent = p.label;
    item.querySelector(".fill").style.width = `${Math.max(0.5, 100 * p.score)}%`;
    item.querySelector(".score").textContent = `${percent}%`;
    return item;
  }));
}

function firstImage(files) {
  const list = [...(files || [])];
  const image = list.find((f) => f.type.startsWith("image/") || f.type === "");
  if (!image && list.length) notAnImage(list[0]);
  return image;
}

$("task").addEventListener("change", () => { showTask(); if (lastImage) classify(lastImage); });
$("topk").addEventListener("change", () => { if (lastImage) classify(lastImage); });
$("min-score").addEventListener("change", () => { if (lastImage) classify(lastImage); });
$("labels").addEventListener("change", () => { if (lastImage) classify(lastImage); });
$("file").addEventListener("change", (e) => { const f = firstImage(e.target.files); if (f) classify(f); });
const drop = $("drop");
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
  e.preventDefault();
  drop.classList.add("over");
}));
["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  const f = firstImage(e.dataTransfer.files);
  if (f) classify(f);
});
document.addEventListener("paste", (e) => {
  const f = firstImage([...e.clipboardData.items].filter((i) => i.kind === "file").map((i) => i.getAsFile()));
  if (f) classify(f);
});
loadTasks();
