// The service's web viewer: pick a model, upload an image (2D) or a case (3D), look at the predicted labels.
// 2D: POST /v1/models/{name}/predict?overlay=true and show the PNG. 3D: POST /v1/models/{name}/view, which answers
// with uint8 volumes in RAS order (axis 0 left->right, 1 posterior->anterior, 2 inferior->superior).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], volume: null };
const PLANES = {
  // [width axis, height axis, fixed axis]; rows run top to bottom, so the height axis is drawn flipped
  axial: [0, 1, 2],
  coronal: [0, 2, 1],
  sagittal: [1, 2, 0],
};

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

function describeInput(model) {
  if (!model) return "";
  if (model.dims === 2) return `2D: one image (${model.input.formats.join(", ")}); ${model.input.size_protocol}`;
  const names = model.input.modalities.map((m) => `<case>_${m}.nii.gz`).join(", ");
  return `3D: a zip of the case, or the ${model.input.modalities.length} files ${names}`;
}

async function loadModels() {
  const answer = await fetch("/v1/models");
  state.models = (await answer.json()).models;
  $("model").replaceChildren(
    ...state.models.map((m) => new Option(`${m.name} (${m.dims}D)`, m.name)),
  );
  $("hint").textContent = describeInput(currentModel());
  document.body.dataset.models = String(state.models.length);
}

async function errorText(answer) {
  try {
    return (await answer.json()).detail;
  } catch {
    return `${answer.status} ${answer.statusText}`;
  }
}

async function run() {
  const model = currentModel();
  const files = $("file").files;
  if (!model || files.length === 0) {
    setStatus("choose a model and a file first", true);
    return;
  }
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  const route = model.dims === 2 ? "predict?overlay=true" : "view";
  setStatus("segmenting…");
  document.body.dataset.done = "";
  const started = performance.now();
  const answer = await fetch(`/v1/models/${encodeURIComponent(model.name)}/${route}`, { method: "POST", body: form });
  if (!answer.ok) {
    setStatus(`refused: ${await errorText(answer)}`, true);
    document.body.dataset.done = "error";
    return;
  }
  if (model.dims === 2) {
    await show2d(await answer.blob());
  } else {
    show3d(await answer.json());
  }
  setStatus(`done in ${Math.round(performance.now() - started)} ms`);
  document.body.dataset.done = String(model.dims);
}

function show2d(blob) {
  $("panel3d").hidden = true;
  $("panel2d").hidden = false;
  const img = $("overlay2d");
  return new Promise((resolve) => {
    img.onload = resolve;
    img.src = URL.createObjectURL(blob);
  });
}

function bytes(b64) {
  const text = atob(b64);
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

function show3d(view) {
  $("panel2d").hidden = true;
  $("panel3d").hidden = false;
  const colours = [[0, 0, 0]];
  for (const entry of view.legend) colours[entry.index] = entry.colour;
  state.volume = { ...view, image: bytes(view.image), labels: bytes(view.labels), colours };
  for (const [plane, [, , fixed]] of Object.entries(PLANES)) {
    const slider = $(`${plane}-slice`);
    slider.max = view.shape[fixed] - 1;
    slider.value = busiestSlice(fixed);
  }
  const legend = $("legend").tBodies[0];
  legend.replaceChildren(
    ...view.legend.map((entry) => row([swatch(entry.colour), String(entry.value), view.volumes_ml.labels[entry.value]])),
  );
  $("regions").tBodies[0].replaceChildren(
    ...Object.entries(view.volumes_ml.regions).map(([name, ml]) => row([name, ml])),
  );
  $("download").href = URL.createObjectURL(new Blob([bytes(view.nifti_gz)], { type: "application/gzip" }));
  drawAll();
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else td.textContent = typeof cell === "number" ? cell.toFixed(2) : cell;
    tr.append(td);
  }
  return tr;
}

function swatch(colour) {
  const span = document.createElement("span");
  span.className = "swatch";
  span.style.background = `rgb(${colour.join(",")})`;
  return span;
}

function index(x, y, z) {
  const [, Y, Z] = state.volume.shape;
  return (x * Y + y) * Z + z;
}

// The slice of an axis with the most labelled voxels: the first view shows the finding, not an empty slice.
function busiestSlice(axis) {
  const { shape, labels } = state.volume;
  const counts = new Array(shape[axis]).fill(0);
  for (let x = 0; x < shape[0]; x++)
    for (let y = 0; y < shape[1]; y++)
      for (let z = 0; z < shape[2]; z++) if (labels[index(x, y, z)]) counts[[x, y, z][axis]]++;
  const best = counts.indexOf(Math.max(...counts));
  return Math.max(...counts) > 0 ? best : Math.floor(shape[axis] / 2);
}

function draw(plane) {
  const v = state.volume;
  const [wAxis, hAxis, fixed] = PLANES[plane];
  const width = v.shape[wAxis];
  const height = v.shape[hAxis];
  const canvas = $(plane);
  canvas.width = width;
  canvas.height = height;
  const scale = 256 / Math.max(v.shape[0] * v.spacing[0], v.shape[1] * v.spacing[1], v.shape[2] * v.spacing[2]);
  canvas.style.width = `${Math.round(width * v.spacing[wAxis] * scale * 1.5)}px`;
  canvas.style.height = `${Math.round(height * v.spacing[hAxis] * scale * 1.5)}px`;
  const alpha = Number($("opacity").value) / 100;
  const slice = Number($(`${plane}-slice`).value);
  const pixels = canvas.getContext("2d").createImageData(width, height);
  const at = [0, 0, 0];
  at[fixed] = slice;
  for (let row = 0; row < height; row++) {
    at[hAxis] = height - 1 - row;
    for (let col = 0; col < width; col++) {
      at[wAxis] = col;
      const i = index(at[0], at[1], at[2]);
      const grey = v.image[i];
      const label = v.labels[i];
      const o = 4 * (row * width + col);
      for (let c = 0; c < 3; c++) {
        pixels.data[o + c] = label ? Math.round((1 - alpha) * grey + alpha * v.colours[label][c]) : grey;
      }
      pixels.data[o + 3] = 255;
    }
  }
  canvas.getContext("2d").putImageData(pixels, 0, 0);
}

function drawAll() {
  if (state.volume) for (const plane of Object.keys(PLANES)) draw(plane);
}

$("model").addEventListener("change", () => {
  $("hint").textContent = describeInput(currentModel());
});
$("run").addEventListener("click", () => run().catch((err) => setStatus(`failed: ${err}`, true)));
$("opacity").addEventListener("input", drawAll);
for (const plane of Object.keys(PLANES)) $(`${plane}-slice`).addEventListener("input", () => draw(plane));
loadModels().catch((err) => setStatus(`cannot list the models: ${err}`, true));
