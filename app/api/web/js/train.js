// The Data and training tab: create a dataset, upload annotated images (an image and its nucleus /
// cell masks, with a split), and fine-tune a model for one (cell line, reporter, object).
import {$, el, setOptions} from "./dom.js";
import {ApiError, api, clearNotice, showError, showNotice} from "./api.js";
import {state} from "./state.js";
import {initPreprocessing, loadRecipeForm, recipeFromForm} from "./preprocessing.js";

export async function loadTrainForm() {
  const [datasets, bases, versions, cellLines] = await Promise.all([api("/api/v1/datasets"), api("/api/v1/base-models"),
    api("/api/v1/models?status=ready"), api("/api/v1/cell-lines")]);
  state.datasets = datasets;
  state.cellLines = cellLines;
  const datasetOptions = datasets.length
    ? datasets.map((d) => el("option", {value: d.id}, `#${d.id} ${d.name} (${d.cell_line}, ${d.images.length} images)`))
    : [el("option", {value: ""}, "no datasets yet")];
  setOptions($("ft-dataset"), datasetOptions.map((o) => o.cloneNode(true)));
  setOptions($("up-dataset"), datasetOptions);
  setOptions($("ds-cell-line"), cellLines.length ? cellLines.map((c) => el("option", {value: c.name}, c.name))
    : [el("option", {value: ""}, "register a cell line in the Model zoo tab first")]);
  renderTrainReporters();
  renderDatasets();
  // Arrays of options are spread: replaceChildren() would print an array as "[object HTMLOptionElement]".
  setOptions($("ft-base"), [el("option", {value: ""}, "the shipped base model"),
    ...bases.map((b) => el("option", {value: b.name}, `base model ${b.name}`)),
    ...versions.map((v) => el("option", {value: `version:${v.id}`},
      `zoo version #${v.id}: ${v.cell_line} · ${v.reporter} · ${v.object} v${v.version}`))]);
  await loadRecipeForm();
}

/** Which masks an image came with, in words ("nuclei + cells"). */
function maskWords(image) {
  return [image.nuclei_sha256 ? "nuclei" : null, image.cells_sha256 ? "cells" : null].filter(Boolean).join(" + ");
}

function renderDatasets() {
  const list = $("datasets-list");
  // How many images are labelled for each object: a cells model can only be trained on cell masks.
  const count = (d, key) => d.images.filter((image) => image[key]).length;
  const labelled = (d) => d.images.length
    ? ` · labelled for nuclei: ${count(d, "nuclei_sha256")}, for cells: ${count(d, "cells_sha256")}` : "";
  list.replaceChildren(...(state.datasets.length ? state.datasets.map((d) => el("li", {"data-dataset": d.id},
    el("strong", {}, `#${d.id} ${d.name}`), ` · ${d.cell_line} · channels ${d.channels.join(", ")} · `,
    (Object.entries(d.split_counts).map(([k, n]) => `${n} ${k}`).join(", ") || "no images yet") + labelled(d)))
    : [el("li", {class: "muted"}, "No datasets yet: create one below.")]));
}

function renderTrainReporters() {
  const ds = state.datasets.find((d) => String(d.id) === $("ft-dataset").value);
  setOptions($("ft-reporter"), ds ? ds.channels.map((c, i) => el("option", {value: c}, `${c} (channel ${i + 1})`)) : []);
  const up = state.datasets.find((d) => String(d.id) === $("up-dataset").value);
  $("up-channels").textContent = up ? `Channels of this dataset, in order: ${up.channels.join(", ")}` : "";
}

async function onCreateDataset(event) {
  event.preventDefault();
  clearNotice();
  try {
    const channels = $("ds-channels").value.split(",").map((c) => c.trim()).filter(Boolean);
    if (!channels.length) throw new ApiError("No channels", "list the reporter of each channel, in order, e.g. GFP, RFP");
    const made = await api("/api/v1/datasets", {method: "POST", json: {name: $("ds-name").value.trim(),
      cell_line: $("ds-cell-line").value, channels}});
    showNotice("Dataset created", `#${made.id} ${made.name}; upload annotated images into it below`, "info");
    event.target.reset();
    await loadTrainForm();
    $("up-dataset").value = String(made.id);
    renderTrainReporters();
  } catch (error) {
    showError(error);
  }
}

async function onUploadImage(event) {
  event.preventDefault();
  clearNotice();
  const button = $("up-submit");
  try {
    const datasetId = Number($("up-dataset").value);
    if (!datasetId) throw new ApiError("No dataset", "create a dataset first");
    const image = $("up-image").files[0];
    if (!image) throw new ApiError("No image", "choose the multi-channel TIFF of the field");
    const form = new FormData();
    form.append("image", image, image.name);
    for (const [name, id] of [["nuclei", "up-nuclei"], ["cells", "up-cells"]]) {
      const file = $(id).files[0];
      if (file) form.append(name, file, file.name);
    }
    if (!$("up-nuclei").files[0] && !$("up-cells").files[0]) {
      throw new ApiError("No annotation", "add a nuclei mask, a cell mask, or both (label images: 0 = background)");
    }
    form.append("split", $("up-split").value);
    button.disabled = true;
    const added = await api(`/api/v1/datasets/${datasetId}/images`, {method: "POST", form});
    showNotice("Image added", `image #${added.id} in the ${added.split} split, labelled for ${maskWords(added)}`,
      "info");
    for (const id of ["up-image", "up-nuclei", "up-cells"]) $(id).value = "";
    await loadTrainForm();
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

async function onFinetuneSubmit(event, onJob) {
  event.preventDefault();
  clearNotice();
  try {
    const datasetId = Number($("ft-dataset").value);
    if (!datasetId) throw new ApiError("No dataset", "create a dataset and upload annotated images first (above)");
    const body = {dataset_id: datasetId, reporter: $("ft-reporter").value, object: $("ft-object").value,
      base: $("ft-base").value, params: {max_epochs: Number($("ft-max-epochs").value) || 300}};
    for (const [id, key] of [["ft-min-epochs", "min_epochs"], ["ft-patience", "patience"],
      ["ft-batch-size", "batch_size"], ["ft-bsize", "bsize"], ["ft-learning-rate", "learning_rate"]]) {
      const raw = $(id).value.trim();
      if (raw !== "") body.params[key] = Number(raw);
    }
    const recipe = recipeFromForm();
    if (recipe) body.params.preprocessing = recipe;
    $("ft-submit").disabled = true;
    const job = await api("/api/v1/jobs/finetune", {method: "POST", json: body});
    showNotice("Fine-tuning started", `job ${job.id.slice(0, 8)}; its page shows the progress`, "info");
    onJob(job.id);
  } catch (error) {
    showError(error);
  } finally {
    $("ft-submit").disabled = false;
  }
}

export function initTrain({onJob}) {
  $("dataset-form").addEventListener("submit", onCreateDataset);
  $("upload-form").addEventListener("submit", onUploadImage);
  $("finetune-form").addEventListener("submit", (event) => onFinetuneSubmit(event, onJob));
  $("ft-dataset").addEventListener("change", renderTrainReporters);
  $("up-dataset").addEventListener("change", renderTrainReporters);
  initPreprocessing();
}
