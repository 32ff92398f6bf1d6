// Talking to the API: every call carries the key; every error (RFC 9457 problem details) becomes an
// ApiError whose title and detail the page shows as they are. Also the notice bar and the
// screen-reader announcements, which every part of the page uses to tell the user something.
import {$} from "./dom.js";
import {state} from "./state.js";

export class ApiError extends Error {
  constructor(title, detail, status = 0, problem = null) {
    super(`${title}: ${detail}`);
    this.title = title;
    this.detail = detail;
    this.status = status;       // 0: the server could not be reached
    this.problem = problem;     // the parsed problem document, when there is one
  }
}

const STATUS_HINTS = {
  401: "Check the API key at the top of the page.",
  403: "Your key does not allow this; ask an administrator for a key with more rights.",
  413: "Send a smaller file, or split the plate into several jobs.",
  503: "The service is busy or restarting; try again in a minute.",
};

async function problemFrom(response) {
  const type = response.headers.get("content-type") || "";
  let title = response.statusText || `Error ${response.status}`;
  let detail = "";
  let problem = null;
  try {
    if (type.includes("json")) {
      problem = await response.json();
      title = problem.title || title;
      detail = typeof problem.detail === "string" ? problem.detail : JSON.stringify(problem.detail || "");
    } else {
      detail = (await response.text()).slice(0, 300);
    }
  } catch (_ignored) {
    detail = "the server's answer could not be read";
  }
  const hint = STATUS_HINTS[response.status];
  if (hint && !detail.includes(hint)) detail = detail ? `${detail}. ${hint}` : hint;
  return new ApiError(title, detail, response.status, problem);
}

/** fetch() with the key. -> parsed JSON, or the Response itself with {raw: true}. */
export async function api(path, {method = "GET", json, form, raw = false} = {}) {
  if (!state.key) throw new ApiError("No API key", "enter your API key at the top of the page first");
  const headers = {"X-API-Key": state.key, Accept: "application/json, application/problem+json"};
  let body;
  if (form) body = form;  // the browser sets the multipart boundary itself
  else if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, {method, headers, body, cache: "no-store"});
  } catch (error) {
    throw new ApiError("The server cannot be reached", `check the network and try again (${error.message})`);
  }
  if (!response.ok) throw await problemFrom(response);
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

// ---------------------------------------------------------------------------------------------
// Notices: errors stay until dismissed or until the user moves to another tab; good news fades.

let noticeTimer = null;

export function showNotice(title, detail, kind = "error") {
  if (noticeTimer) clearTimeout(noticeTimer);
  noticeTimer = kind === "info" ? setTimeout(clearNotice, 8000) : null;
  $("notice-title").textContent = title;
  $("notice-detail").textContent = detail || "";
  $("notice").className = `notice ${kind}`;
  $("notice").setAttribute("role", kind === "error" ? "alert" : "status");
  $("notice").hidden = false;
}

export function showError(error) {
  if (error instanceof ApiError) showNotice(error.title, error.detail);
  else showNotice("Something went wrong in the page", String(error && error.message ? error.message : error));
}

/** Hide the notice; with {errorsOnly: true} good news stays (it fades by itself). */
export function clearNotice({errorsOnly = false} = {}) {
  if (errorsOnly && !$("notice").classList.contains("error")) return;
  if (noticeTimer) clearTimeout(noticeTimer);
  noticeTimer = null;
  $("notice").hidden = true;
}

/** Say something to screen-reader users without moving their focus (an aria-live region). */
export function announce(text) {
  const live = $("live");
  live.textContent = "";
  // A fresh text node after a tick is announced even when the words repeat.
  setTimeout(() => { live.textContent = text; }, 30);
}

/** The connection line at the top: "connected", "server unreachable — retrying in 6 s", ... */
export function setConnection(text, kind = "ok") {
  const node = $("conn-state");
  node.textContent = text;
  node.className = `conn ${kind}`;
}

/** A result file fetched with the key, as an object URL (cached: results never change). */
export async function resultBlobUrl(result) {
  const cacheKey = `${result.url}#${result.sha256}`;
  if (!state.blobUrls.has(cacheKey)) {
    const response = await api(result.url, {raw: true});
    state.blobUrls.set(cacheKey, URL.createObjectURL(await response.blob()));
  }
  return state.blobUrls.get(cacheKey);
}
