// CellFuse web page: the entry point. Plain ES modules, no build step, no external resources.
// Where things are:
//   api.js           calls with the key, problem details, notices, screen-reader announcements
//   state.js         the shared state (key, role, lists on screen)
//   dom.js           element and number helpers, the short explanations (F1, mAP, thresholds)
//   segment.js       the Segment tab (files checked, channels, models per channel, submit)
//   jobs.js          the Jobs tab and a job's page (#/jobs/<id>), polling with back-off
//   viewer.js        the deep-zoom result viewer (OpenSeadragon, vendored in ../vendor)
//   measurements.js  per-object measurements: sortable table and histogram
//   plate.js         the 96/384-well map of a plate
//   zoo.js           the Model zoo tab (versions, compare, evaluate, promote, cell lines, reporters)
//   train.js         the Data and training tab (datasets, annotated uploads, fine-tuning)
//   charts.js        SVG charts (training curve, histogram) and the heat-map colours
import {$} from "./dom.js";
import {ApiError, api, clearNotice, setConnection, showError, showNotice} from "./api.js";
import {mayDo, resetData, state} from "./state.js";
import {initSegment, loadReference, renderChannelRows} from "./segment.js";
import {clearJobs, initJobs, openJob, pollJobs, schedulePoll, selectJob, stopPolling} from "./jobs.js";
import {initZoo, loadZoo} from "./zoo.js";
import {initTrain, loadTrainForm} from "./train.js";

const KEY_STORAGE = "cellfuse.apiKey";
const TABS = ["segment", "jobs", "zoo", "train"];
const ROLE_WORDS = {
  instrument: "instrument: may segment and see its own jobs",
  scientist: "scientist: may also manage data, fine-tune, evaluate and see every job",
  admin: "admin: may do everything, including moving aliases and managing keys",
};

function setKey(key) {
  state.key = key.trim();
  if (state.key) localStorage.setItem(KEY_STORAGE, state.key);
  else localStorage.removeItem(KEY_STORAGE);
  $("api-key").value = state.key;
  $("key-state").textContent = state.key ? "key saved in this browser" : "no key yet";
}

async function onKeySaved() {
  clearNotice();
  try {
    const me = await api("/api/v1/keys/me");
    state.role = me.role;
    $("key-role").textContent = `${me.name} · ${ROLE_WORDS[me.role] || me.role}`;
    $("key-role").hidden = false;
    document.body.dataset.role = me.role;
    for (const node of document.querySelectorAll("[data-needs]")) node.hidden = !mayDo(node.dataset.needs);
    await loadReference();
    $("key-state").textContent = "key saved";
    setConnection("connected", "ok");
    refreshCurrentTab();
    schedulePoll(0);
  } catch (error) {
    if (error instanceof ApiError && error.status === 0) setConnection("server unreachable", "bad");
    showError(error);
  }
}

/** Forget the key and everything that was shown with it. */
function forget() {
  setKey("");
  stopPolling();
  resetData();
  clearNotice();
  clearJobs();
  for (const id of ["versions-body", "aliases-body", "cell-lines-body", "reporters-body", "channel-sets",
    "datasets-list"]) $(id).replaceChildren();
  for (const id of ["curve-panel", "compare-panel", "key-role"]) $(id).hidden = true;
  $("seg-cell-line").replaceChildren();
  renderChannelRows();
  setConnection("", "ok");
  delete document.body.dataset.role;
  showNotice("Key forgotten", "this browser no longer keeps it; the page shows nothing until a key is entered", "info");
}

function showTab(name) {
  state.tab = name;
  // An error belongs to the tab it came from: moving on clears it.
  clearNotice({errorsOnly: true});
  for (const button of document.querySelectorAll(".tabs [role=tab]")) {
    const selected = button.dataset.tab === name;
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
  }
  for (const section of document.querySelectorAll("section.tab")) section.hidden = section.dataset.tab !== name;
  refreshCurrentTab();
  schedulePoll(0);
}

function refreshCurrentTab() {
  if (!state.key) return;
  const run = {segment: loadReference, jobs: pollJobs, zoo: loadZoo, train: loadTrainForm}[state.tab];
  if (run) run().catch(showError);
}

/** #/jobs/<id> opens a job's page; #/zoo etc. a tab. */
function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const job = hash.match(/^jobs\/([0-9a-f-]{36})$/);
  if (job) {
    state.selectedJobId = job[1];
    if (state.tab !== "jobs") showTab("jobs");
    if (state.key) selectJob(job[1]);
    return;
  }
  const tab = TABS.includes(hash) ? hash : null;
  if (tab && tab !== state.tab) showTab(tab);
}

function goToJob(jobId) {
  openJob(jobId);
}

function init() {
  const tabs = [...document.querySelectorAll(".tabs [role=tab]")];
  for (const button of tabs) {
    button.addEventListener("click", () => { location.hash = `#/${button.dataset.tab}`; showTab(button.dataset.tab); });
    // Arrow keys move between tabs (the WAI-ARIA tabs pattern).
    button.addEventListener("keydown", (event) => {
      const step = {ArrowRight: 1, ArrowLeft: -1}[event.key];
      if (!step) return;
      const next = tabs[(tabs.indexOf(button) + step + tabs.length) % tabs.length];
      next.focus();
      next.click();
    });
  }
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKey($("api-key").value);
    if (state.key) onKeySaved();
  });
  $("key-forget").addEventListener("click", forget);
  $("notice-close").addEventListener("click", () => clearNotice());
  initSegment(goToJob);
  initJobs();
  initZoo({onJob: goToJob, afterReference: loadReference});
  initTrain({onJob: goToJob});
  document.addEventListener("visibilitychange", () => { if (!document.hidden) schedulePoll(0); });
  window.addEventListener("hashchange", route);
  setKey(localStorage.getItem(KEY_STORAGE) || "");
  route();
  if (state.key) onKeySaved();
  else showNotice("Welcome", "enter your API key at the top of the page to start", "info");
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
