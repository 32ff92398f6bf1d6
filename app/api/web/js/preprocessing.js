// Preprocessing recipes and illumination profiles: the recipe part of the fine-tune form, a recipe
// in words (zoo), the stored profiles with their flat-field previews and the upload of a measured
// flat-field (zoo tab), and what a segmentation applied per object and channel (job page).
import {$, el, fmt, scroller, setOptions} from "./dom.js";
import {ApiError, api, clearNotice, showError, showNotice} from "./api.js";
import {mayDo} from "./state.js";

export const RECIPE_HELP = {
  none: "No shading correction: the raw pixels go to the network.",
  "per-plate": "BaSiC estimates each channel's flat-field from all fields of the plate (or dataset) and divides it out.",
  profile: "A stored flat-field (estimated earlier or measured on a uniform slide) is divided out; it must match the field size.",
  "norm-per-image": "Each field is scaled by its own 1st–99th percentile (Cellpose's default).",
  "norm-per-plate": "All fields share the plate's percentiles, so a dim field stays dim.",
};

let profiles = [];   // the stored profiles, newest first (refreshed with the zoo and the form)

/** {illumination: "per-plate", ...} -> "per-plate shading correction (BaSiC) · per-plate percentiles 1–99". */
export function recipeWords(recipe) {
  const r = recipe || {};
  const light = {none: "no shading correction", "per-plate": "per-plate shading correction (BaSiC)",
    profile: `shading corrected with stored profile #${r.profile_id}`}[r.illumination || "none"] || r.illumination;
  const dark = r.darkfield ? " with darkfield" : "";
  const norm = (r.normalization || "per-image") === "per-plate" ? "per-plate" : "per-image";
  return `${light}${dark} · ${norm} percentiles ${fmt(r.lower_percentile ?? 1, 1)}–${fmt(r.upper_percentile ?? 99, 1)}`;
}

export async function loadProfiles() {
  profiles = await api("/api/v1/illumination-profiles");
  return profiles;
}

const previews = new Map();   // "id/channel" -> object URL (a profile never changes)

/** A channel's flat-field preview as an object URL (fetched with the key: an <img src> cannot send it). */
export async function previewUrl(profileId, channel) {
  const key = `${profileId}/${channel}`;
  if (!previews.has(key)) {
    const response = await api(`/api/v1/illumination-profiles/${profileId}/preview.png?channel=${channel}`, {raw: true});
    previews.set(key, URL.createObjectURL(await response.blob()));
  }
  return previews.get(key);
}

/** A labelled flat-field image; the picture arrives when fetched. */
function previewFigure(profileId, channelIndex, caption) {
  const img = el("img", {class: "profile-preview", alt: `flat-field of ${caption}`, width: 96, height: 96,
    "data-profile": profileId});
  previewUrl(profileId, channelIndex).then((url) => { img.src = url; }).catch(showError);
  return el("figure", {class: "profile-figure"}, img, el("figcaption", {}, caption));
}

// ---------------------------------------------------------------------------------------------
// The fine-tune form

export async function loadRecipeForm() {
  await loadProfiles().catch(() => { profiles = []; });
  setOptions($("ft-profile"), profiles.length
    ? profiles.map((p) => el("option", {value: p.id}, `#${p.id} ${p.name} (${p.source}; ${p.channels.join(", ")}; ` +
      `${p.height}×${p.width})`))
    : [el("option", {value: ""}, "no stored profiles yet (Model zoo tab)")]);
  updateRecipeForm();
}

function updateRecipeForm() {
  const light = document.querySelector("input[name='ft-illumination']:checked").value;
  $("ft-profile").disabled = light !== "profile";
  $("ft-darkfield").disabled = light !== "per-plate";
}

/** The form's recipe, or null for the default (no correction, per-image) so older servers see nothing new. */
export function recipeFromForm() {
  const illumination = document.querySelector("input[name='ft-illumination']:checked").value;
  const normalization = document.querySelector("input[name='ft-normalization']:checked").value;
  const recipe = {illumination, normalization};
  if (illumination === "profile") {
    const id = Number($("ft-profile").value);
    if (!id) throw new ApiError("No profile", "choose a stored illumination profile, or another correction");
    recipe.profile_id = id;
  }
  if (illumination === "per-plate" && $("ft-darkfield").checked) recipe.darkfield = true;
  return illumination === "none" && normalization === "per-image" ? null : recipe;
}

// ---------------------------------------------------------------------------------------------
// The zoo: stored profiles and the upload of a measured flat-field

export async function renderProfiles() {
  const list = $("profiles-list");
  const rows = await loadProfiles();
  list.replaceChildren(...(rows.length ? rows.map((p) => el("div", {class: "profile-card", id: `profile-${p.id}`},
    el("h4", {}, `#${p.id} ${p.name}`),
    el("p", {class: "muted small-text"}, `${p.source === "uploaded" ? "measured flat-field, uploaded" : "estimated by BaSiC"}` +
      `${p.dataset_id ? ` on dataset #${p.dataset_id}` : ""}${p.job_id ? ` by job ${p.job_id.slice(0, 8)}` : ""} · ` +
      `${p.height}×${p.width} px${p.has_darkfield ? " · with darkfield" : ""}`),
    el("div", {class: "profile-figures"}, p.channels.map((c, i) => previewFigure(p.id, i, c)))))
    : [el("p", {class: "muted"}, "No profiles yet: a fine-tune or segmentation with per-plate correction " +
      "stores one, or upload a measured flat-field below.")]));
  $("profile-form").hidden = !mayDo("scientist");
}

/** Scroll to a profile in the list (the zoo's link from a version to its training profile). */
export function showProfile(id) {
  const card = $(`profile-${id}`);
  if (!card) return;
  for (const c of document.querySelectorAll(".profile-card.selected")) c.classList.remove("selected");
  card.classList.add("selected");
  card.scrollIntoView({block: "nearest"});
}

async function onUploadProfile(event) {
  event.preventDefault();
  clearNotice();
  const button = $("pf-submit");
  try {
    const file = $("pf-file").files[0];
    if (!file) throw new ApiError("No flat-field", "choose the flat-field TIFF (one plane per channel)");
    const form = new FormData();
    form.append("name", $("pf-name").value.trim());
    form.append("channels", $("pf-channels").value);
    form.append("flatfield", file, file.name);
    button.disabled = true;
    const made = await api("/api/v1/illumination-profiles", {method: "POST", form});
    showNotice("Profile stored", `#${made.id} ${made.name}: ${made.channels.join(", ")}, ${made.height}×${made.width}`,
      "info");
    event.target.reset();
    await renderProfiles();
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

export function initPreprocessing() {
  for (const input of document.querySelectorAll("input[name='ft-illumination']")) {
    input.addEventListener("change", updateRecipeForm);
  }
  for (const [key, id] of [["none", "ft-help-none"], ["per-plate", "ft-help-per-plate"], ["profile", "ft-help-profile"],
    ["norm-per-image", "ft-help-norm-per-image"], ["norm-per-plate", "ft-help-norm-per-plate"]]) {
    $(id).textContent = RECIPE_HELP[key];
  }
  $("profile-form").addEventListener("submit", onUploadProfile);
}

// ---------------------------------------------------------------------------------------------
// A segmentation's job page: what each object/channel went through (from provenance.json)

export async function fillJobPreprocessing(box, job) {
  const result = job.results.find((r) => r.name === "provenance.json");
  if (!result) return;
  const response = await api(result.url, {raw: true});
  const provenance = await response.json();
  const byObject = provenance.preprocessing || {};
  if (!Object.keys(byObject).length) {
    box.replaceChildren(el("p", {class: "muted"}, "No preprocessing was recorded for this job."));
    return;
  }
  const known = new Map();
  const profileOf = async (id) => {
    if (!known.has(id)) known.set(id, api(`/api/v1/illumination-profiles/${id}`).catch(() => null));
    return known.get(id);
  };
  const rows = [];
  const figures = new Map();   // "profile/channel" -> its image, once even when two objects share it
  for (const [object, channels] of Object.entries(byObject)) {
    for (const [channel, used] of Object.entries(channels)) {
      const ref = used.illumination_profile;
      let named = "none";
      if (ref && ref.id) {
        const why = ref.used_because ? `, ${ref.used_because}` : "";
        named = `#${ref.id} (${ref.source}${why})`;
        const profile = await profileOf(ref.id);
        const index = profile ? profile.channels.indexOf(channel) : -1;
        const key = `${ref.id}/${channel}`;
        if (index >= 0 && !figures.has(key)) {
          figures.set(key, previewFigure(ref.id, index, `${channel} · profile #${ref.id} (${ref.source}${why})`));
        }
      }
      const p = used.percentiles;
      rows.push(el("tr", {"data-object": object, "data-channel": channel}, el("td", {}, object), el("td", {}, channel),
        el("td", {class: "recipe"}, recipeWords(used.recipe)),
        el("td", {class: "recipe-source"}, used.recipe_source === "request" ? "request override" : used.recipe_source),
        el("td", {class: "num"}, Array.isArray(p) ? `${fmt(p[0], 1)} – ${fmt(p[1], 1)}` : "per image"),
        el("td", {class: "profile-ref"}, named)));
    }
  }
  box.replaceChildren(...[
    el("p", {class: "muted small-text"}, "The recipe comes from each channel model's card unless the request " +
      "overrode it. Percentiles: the intensities mapped to 0 and 1 (per plate), or each field's own (per image)."),
    scroller(el("table", {class: "list preprocessing-table"}, el("thead", {}, el("tr", {}, el("th", {}, "Object"),
      el("th", {}, "Channel"), el("th", {}, "Recipe"), el("th", {}, "Source"), el("th", {}, "Percentiles"),
      el("th", {}, "Illumination profile"))), el("tbody", {}, rows))),
    figures.size ? el("p", {class: "muted small-text"}, "The flat-fields divided out, per channel " +
      "(bright = more light reached the camera there):") : null,
    figures.size ? el("div", {class: "profile-figures"}, [...figures.values()]) : null].filter(Boolean));
}
