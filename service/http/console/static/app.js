// Face console: plain JavaScript, no dependencies, nothing loaded from elsewhere.
// Every API call goes through api(), which adds the API key kept in sessionStorage and turns the
// service's error bodies ({"error": {"code", "message", "details"}}) into readable sentences.
// Every gallery call goes to the collection picked in the header (inCollection()), and a list's (or a
// panel's) buttons act in the collection that list was loaded from; an answer that comes after the
// collection changed, or after a newer request of its kind, is not drawn. GET /whoami decides
// whether the admin parts (Keys, Audit, new/delete collection, collection settings) are shown. A new key's secret is held
// only in the page (never in storage) unless the admin chooses "Use this key now".
// User data (identity ids, metadata, file names) is only ever set as textContent, never as HTML.
"use strict";

const API = new URL("../", window.location.href); // the console lives at <api>/console/
const KEY_STORE = "face-console.api-key";
const COLLECTION_STORE = "face-console.collection";
const DEFAULT_COLLECTION = "default";
const PAGES = ["try", "enroll", "gallery", "group", "status", "keys", "audit"];
const ADMIN_PAGES = new Set(["keys", "audit"]);
const COLORS = { known: "#00c853", unknown: "#ffab00", landmark: "#00b0ff" };

// code -> sentence; the code itself is shown next to it for people who search the docs
const ERROR_MESSAGES = {
  invalid_request: "The request was not valid.",
  malformed_json: "The request body was not valid JSON.",
  payload_too_large: "The upload is too large for this service.",
  headers_too_large: "The request's headers are too large for this service (a very long cookie or header?).",
  too_many_faces: "Too many images or faces in one request.",
  no_images: "No image was sent.",
  invalid_base64: "An image was not valid base64.",
  unsupported_media_type: "The request was sent in a format the service does not accept.",
  empty_image: "The file is empty.",
  image_too_large: "The image is too large (bytes or pixels) for this service.",
  not_an_image: "This file is not an image the service can read (JPEG, PNG, WebP or BMP).",
  truncated_image: "The image file is cut off or damaged.",
  wrong_image_size: "An aligned face must be exactly the model's input size.",
  alpha_channel: "The image has transparency; send an opaque image.",
  unsupported_color_mode: "The image's colour mode is not supported.",
  no_face: "No face was found in the photo.",
  low_quality: "The face is not good enough to store (blurred, too small, too dark or bright, or turned away); the reasons follow.",
  photo_not_supported: "This model only accepts aligned face crops, not photos.",
  model_mismatch: "The embeddings were made by another model than the one served.",
  wrong_dimension: "An embedding has the wrong number of values for this model.",
  invalid_embedding: "An embedding is not usable (NaN, infinite or zero).",
  identity_not_found: "No identity with this id is enrolled.",
  identity_exists: "Another enrolled identity already has this id: pick another (or merge the two instead).",
  too_many_faces_for_collection: "The collection holds as many faces as its limit allows (max_faces): delete some, or ask an admin to raise the limit.",
  identity_changed: "Someone changed this identity since you opened it; nothing was saved. Close and edit it again to start from what is stored now.",
  face_not_found: "No face with this id is enrolled in this collection (it may have been deleted or moved meanwhile).",
  same_identity: "The two identities are the same one: pick another.",
  invalid_identity_id: "This identity id is not allowed (1-128 characters, no \"/\", nothing invisible, not blank).",
  invalid_metadata: "The metadata is not valid (a JSON object of finite numbers and valid text, not too deeply nested).",
  metadata_too_large: "The metadata is too large for this service.",
  too_many_faces_for_identity: "This identity would hold more faces than the service allows; replace its faces instead.",
  implausible_face: "A face resembles many different enrolled people at once, which real faces do not; it was not enrolled.",
  gallery_loading: "The gallery is still loading after a restart; try again in a moment.",
  gallery_unavailable: "The gallery could not be loaded; the service log says why.",
  overloaded: "The service is busy right now; try again in a moment.",
  inference_timeout: "The model did not answer in time; try again in a moment.",
  database_unavailable: "The gallery database cannot be reached right now; try again in a moment.",
  write_outcome_unknown: "The database connection failed while this change was being saved: it may or may not have been saved. Reload to check before trying again.",
  storage_full: "The gallery's disk is full, so nothing was saved; ask the operator to free space, then try again.",
  collection_damaged: "This collection's stored data is damaged and cannot be read; the operator must restore it from a backup (the other collections work).",
  catalog_damaged: "The service's list of collections and keys is damaged and cannot be read; the operator must restore it from a backup.",
  unauthorized: "The API key is missing or wrong (or revoked, or expired).",
  forbidden: "This API key may not do this (its role or its collections do not allow it).",
  collection_not_found: "No collection of this name exists (it may have been deleted).",
  collection_exists: "A collection of this name already exists.",
  collection_protected: "The collection \"default\" always exists and cannot be deleted.",
  collection_in_use: "Aliases point to this collection, or keys are scoped to it: re-point or delete the aliases and revoke the keys first.",
  alias_not_found: "No alias of this name.",
  model_not_found: "This service does not serve that model (or the collection is pinned to a model it does not serve).",
  possible_duplicate: "These faces look like a person already enrolled under another id: nothing was saved.",
  crops_required: "This collection keeps a crop of every face: enroll photos or crops, not embeddings.",
  crop_key_missing: "Keeping face crops needs the service to be started with a crop key (FACE_CROP_KEY_FILE).",
  crop_not_kept: "No crop is kept of this face: its collection keeps none (made without keep_crops), or the face was imported without one.",
  no_source_crops: "This collection has faces without a kept crop, so it cannot be re-embedded: enroll its people again from their photos into the new collection.",
  job_running: "A job of this collection is already queued or running: wait for it or cancel it.",
  migration_unfinished: "That collection is the new one of a migration not yet done: point the alias at it once the migration is done.",
  job_not_found: "No job with this id exists.",
  job_finished: "This job has already finished.",
  invalid_collection_name: "This collection name is not allowed (lower-case letters, digits, \"-\" and \"_\", up to 63, starting with a letter or digit).",
  key_not_found: "No API key with this id exists.",
  rate_limited: "Too many requests or faces for this key right now.",
  host_not_allowed: "The service does not answer to this address: its operator lists the names it answers to in FACE_ALLOWED_HOSTS.",
  cross_origin_refused: "The service refused a change sent from a page of another site.",
  not_found: "Not found.",
  method_not_allowed: "The service does not allow this here.",
  model_not_ready: "The service is starting or stopping; try again in a moment.",
  internal_error: "The service failed unexpectedly; its log says why.",
  network: "The service cannot be reached.",
};

const $ = (id) => document.getElementById(id);

// text: a string, or parts (strings and nodes, as iso`...` gives them)
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "text") setText(node, value);
    else if (name === "class") node.className = value;
    else if (name.startsWith("data-") || name.startsWith("aria-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function setText(node, text) {
  if (Array.isArray(text)) node.replaceChildren(...text);
  else node.textContent = text;
}

// A string from the API (a key's note, a metadata key or value, an identity id) amid the console's own
// text is a <bdi> of its own: a direction control in it (U+202E reverses all that follows) or its
// right-to-left letters end with it, instead of reordering the console's words after it.
const bdi = (value) => el("bdi", { text: String(value) });

// the console's text with strings from the API in it, as a tagged template: each string put in is a
// <bdi> (numbers and nodes go as they are, the parts of a nested iso`...` are spread in)
function iso(strings, ...values) {
  const parts = [strings[0]];
  values.forEach((value, i) => {
    if (Array.isArray(value)) parts.push(...value);
    else if (typeof value === "string") parts.push(value && bdi(value));
    else parts.push(value instanceof Node ? value : String(value));
    parts.push(strings[i + 1]);
  });
  return parts.filter((part) => part !== "");
}

// a JSON value as text, each of its strings (object keys too) isolated between its quotes: reads as
// JSON.stringify(value) reads
function jsonParts(value) {
  if (typeof value === "string") return ['"', bdi(JSON.stringify(value).slice(1, -1)), '"'];
  const list = (items, part) => items.flatMap((item, i) => [...(i ? [","] : []), ...part(item)]);
  if (Array.isArray(value)) return ["[", ...list(value, jsonParts), "]"];
  if (value && typeof value === "object") {
    return ["{", ...list(Object.entries(value), ([name, item]) => [...jsonParts(name), ":", ...jsonParts(item)]), "}"];
  }
  return [JSON.stringify(value)];
}

const fmt = (x, digits = 3) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "-");

// --- API ------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(code, message, status, details, action = "") {
    super(message);
    this.code = code;
    this.status = status;
    this.details = details || {};
    this.action = action; // what the call tried, in words ("enroll into collection \"x\""): for forbidden
  }

  get readable() {
    let sentence = ERROR_MESSAGES[this.code] || this.message || "Request failed.";
    if (this.code === "forbidden" && this.action) {
      sentence = `This API key may not ${this.action} (its role or its collections do not allow it).`;
    }
    if (this.code === "rate_limited" && this.details.retry_after) sentence += ` Try again in ${this.details.retry_after} s.`;
    const where = typeof this.details.index === "number" ? ` (image ${this.details.index + 1})` : "";
    const reasons = Array.isArray(this.details.reasons)  // low_quality: each limit missed
      ? ` ${this.details.reasons.map((r) => `${r.part} ${fmt(r.value, 2)} (limit ${fmt(r.limit, 2)})`).join(", ")}` : "";
    const ids = this.details.identity_ids;  // identity_not_found from /identify's among: each id not enrolled
    const named = this.code === "identity_not_found" && Array.isArray(ids) && ids.length
      ? ` Not enrolled: ${ids.map((id) => JSON.stringify(String(id))).join(", ")}.` : "";
    return `${sentence}${where}${reasons}${named} [${this.code}]`;
  }
}

const config = { api_key_header: "X-API-Key", api_key_required: false };

// blob: the answer as a Blob (a face crop's PNG); errors are still the service's JSON envelope
async function api(path, { method = "GET", form = null, json = null, text = false, blob = false, action = "" } = {}) {
  const headers = { Accept: text ? "text/plain" : blob ? "image/png, application/json" : "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers[config.api_key_header] = key;
  let body = null;
  if (form) body = form;
  else if (json) {
    body = JSON.stringify(json);
    headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(new URL(path, API), { method, headers, body, cache: "no-store" });
  } catch (err) {
    throw new ApiError("network", String(err), 0);
  }
  if (!response.ok) {
    let error = { code: `http_${response.status}`, message: response.statusText };
    try {
      const parsed = await response.json();
      if (parsed && parsed.error) error = parsed.error;
    } catch (_) { /* not JSON: keep the HTTP status */ }
    const details = { ...(error.details || {}) };
    const retry = response.headers.get("Retry-After");
    if (retry && details.retry_after === undefined) details.retry_after = retry;
    const failure = new ApiError(error.code, error.message, response.status, details, action);
    if (failure.code === "unauthorized") askForKey(key ? "The stored API key was refused." : "");
    throw failure;
  }
  if (blob) return response.blob();
  return text ? response.text() : response.json();
}

function photoForm(fields, files) {
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) form.append(name, String(value));
  for (const [name, file] of files) form.append(name, file, file.name || name);
  return form;
}

function say(node, message, kind = "") {
  setText(node, message);
  node.classList.toggle("error", kind === "error");
  node.classList.toggle("ok", kind === "ok");
}

// --- API key -----------------------------------------------------------------------------------
function askForKey(reason = "") {
  const dialog = $("key-dialog");
  say($("key-error"), reason, reason ? "error" : "");
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

async function submitKey(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  const previous = sessionStorage.getItem(KEY_STORE);
  sessionStorage.setItem(KEY_STORE, key);
  say($("key-error"), "Checking...");
  try {
    await api("whoami"); // any valid key, whatever its role
  } catch (err) {
    if (previous) sessionStorage.setItem(KEY_STORE, previous);
    else sessionStorage.removeItem(KEY_STORE);
    say($("key-error"), err.readable, "error");
    return;
  }
  $("key-input").value = "";
  say($("key-error"), "");
  $("key-dialog").close();
  await refreshSession();
  route();
}

// --- who is using the console, and in which collection -------------------------------------------
// keepCrops: the collections made with keep_crops (GET /collections says so), whose faces' crops a
// write key sees as thumbnails in the gallery views; damaged: those whose stored data the server
// cannot read (every request to one is refused collection_damaged), marked in the picker
const session = { role: null, admin: false, keyId: null, scope: null, openMode: false, keepCrops: new Set(),
  damaged: new Set() };

function collection() {
  return sessionStorage.getItem(COLLECTION_STORE) || DEFAULT_COLLECTION;
}

const quoted = (name) => `collection "${name}"`;

// a gallery route in collection `name`: the one chosen when the request is a page's own, and for a
// button the collection its row or panel was loaded from (never the one chosen at click time: the two
// may differ). "default" keeps the unprefixed route (services before collections have only those,
// and they mean the same collection)
function inCollection(name, rest) {
  return name === DEFAULT_COLLECTION ? rest : `collections/${encodeURIComponent(name)}/${rest}`;
}

// said after an action's result when the collection it acted in is no longer the one chosen
const elsewhere = (name) => (name === collection() ? "" : ` (in ${quoted(name)})`);

async function loadWhoami() {
  Object.assign(session, { role: null, keyId: null, scope: null, openMode: false });
  const me = await api("whoami");
  Object.assign(session, { role: me.role, keyId: me.key_id, scope: me.collections, openMode: me.open_mode });
  session.admin = session.role === "admin";
}

// the key's role where it shows (body's data-role, the admin pages, the header): at a switch's end
function showRole() {
  document.body.dataset.role = session.role || "";
  for (const node of document.querySelectorAll("[data-admin]")) node.hidden = !session.admin;
  const who = session.openMode ? "open mode (no key needed)"
    : session.role ? `${session.role} key ${session.keyId === "env" ? "from FACE_API_KEY" : session.keyId || ""}`.trim() : "";
  $("whoami").textContent = who;
}

function fillSelect(select, names, { keep = true, extra = [] } = {}) {
  const chosen = keep ? new Set([...select.selectedOptions].map((o) => o.value)) : new Set();
  select.replaceChildren(...extra.map(([value, text]) => el("option", { value, text })),
    ...names.map((name) => el("option", { value: name, text: name })));
  for (const option of select.options) option.selected = chosen.has(option.value);
}

async function loadCollections() {
  let names = null;
  session.keepCrops = new Set();
  session.damaged = new Set();
  try {
    const items = (await api("collections", { action: "list collections" })).items;
    names = items.map((item) => item.name);
    session.keepCrops = new Set(items.filter((item) => item.keep_crops).map((item) => item.name));
    session.damaged = new Set(items.filter((item) => item.damaged).map((item) => item.name));
  } catch (err) {
    if (err.code === "unauthorized") throw err;
    // no right to list them (an embed key), or rate limited: the key's own scope, else default
  }
  if (session.scope) names = names ? names.filter((n) => session.scope.includes(n)) : [...session.scope];
  if (!names || !names.length) names = session.scope && session.scope.length ? [...session.scope] : [DEFAULT_COLLECTION];
  names.sort((a, b) => (a === DEFAULT_COLLECTION ? -1 : b === DEFAULT_COLLECTION ? 1 : a < b ? -1 : a > b ? 1 : 0));
  let chosen = collection();
  if (!names.includes(chosen)) chosen = names.includes(DEFAULT_COLLECTION) ? DEFAULT_COLLECTION : names[0];
  fillSelect($("collection-select"), names, { keep: false });
  for (const option of $("collection-select").options) {
    if (session.damaged.has(option.value)) option.text = `${option.value} (damaged)`;
  }
  fillSelect($("keys-collections"), names);
  fillSelect($("audit-collection"), names, { extra: [["", "any"]] });
  markChosen(chosen);
  sayIfDamaged(chosen);
}

// a collection the server cannot read (collection_damaged): said over every page while it is chosen
function sayIfDamaged(name) {
  const damaged = session.damaged.has(name);
  say($("collection-status"), damaged ? ERROR_MESSAGES.collection_damaged : "", damaged ? "error" : "");
}

function markChosen(name) {
  sessionStorage.setItem(COLLECTION_STORE, name);
  $("collection-select").value = name;
  $("collection-delete").disabled = name === DEFAULT_COLLECTION;
  $("collection-delete").title = name === DEFAULT_COLLECTION ? ERROR_MESSAGES.collection_protected : "";
  document.body.dataset.collection = name;
}

// A key switch (the API-key prompt, "Use this key now", the start): the key's /whoami, then its
// collections. body's data-switching is set while it lasts, and the key's role is shown only at its end,
// once both are known: a role seen means the switch has ended. A page chosen meanwhile is drawn once, at
// the end (route() waits for it), not once for the key left and again for the new one: a row clicked
// between the two drawings was gone (the Keys page's Revoke buttons).
let switches = 0; // those under way

async function refreshSession() {
  switches += 1;
  document.body.dataset.switching = "true";
  let known = false;
  try {
    await loadWhoami();
    known = true;
    await loadCollections();
  } catch (err) {
    say($("collection-status"), err.readable, "error");
  } finally {
    switches -= 1;
    if (known) showRole();
    if (!switches) delete document.body.dataset.switching;
  }
}

function chooseCollection(name) {
  markChosen(name);
  // what the pages show belongs to the collection they were loaded for
  Object.assign(gallery, { query: "", page: 0, cursors: [null], next: null });
  $("gallery-query").value = "";
  galleryRun += 1; // a list still coming is of the collection left: not drawn
  $("gallery-table").tBodies[0].replaceChildren();
  $("gallery-title").textContent = `Gallery: ${quoted(name)}`;
  resetHygiene();
  $("try-results").replaceChildren();
  $("try-file").value = ""; // picking the same photo again asks the new collection
  tryFile = null;
  tryRun += 1; // an answer still coming is from the collection left: not drawn
  compareRun += 1; // likewise a comparison's
  $("compare-result").replaceChildren();
  $("compare-result").removeAttribute("data-similarity");
  delete $("try-canvas").dataset.state;
  say($("try-status"), `Pick a photo to see every face, who it matches in ${quoted(name)} and how sure.`);
  sayIfDamaged(name);
  say($("settings-status"), "");
  route();
}

// A collection's settings, as the New collection and Collection settings dialogs ask for them: the
// name in the API, the field's id after "collection-" or "settings-", and the Status page's row (a
// dialog's sentences name the field by its label).
const COLLECTION_SETTINGS = [
  ["retention_days", "retention", "Faces kept"],
  ["max_faces", "max-faces", "Face limit"],
  ["identify_fpir", "fpir", "Identify FPIR"],
];

function settingText(key, value) {
  if (key === "retention_days") return value == null ? "until deleted" : `${show(value)} day(s) after enrollment, then erased`;
  if (key === "max_faces") return value == null ? "none" : `${show(value)} faces`;
  return value == null ? "the service's" : String(value); // an FPIR such as 0.0001: every digit counts
}

// the settings typed in a dialog ("collection" or "settings"): each a number, or null where empty;
// or, where one is not a number at all, why and which field (an <input type=number> whose text is not
// a number reads as "": sent as null, it would silently put the setting back to its default)
function typedSettings(prefix) {
  const values = {};
  for (const [key, field] of COLLECTION_SETTINGS) {
    const input = $(`${prefix}-${field}`);
    const text = input.value.trim();
    const value = text === "" ? null : Number(text);
    if (input.validity.badInput || (value !== null && !Number.isFinite(value))) {
      return { problem: `${fieldLabel(input.id)}: type a number, or leave the field empty; nothing was saved.`, field: input.id };
    }
    values[key] = value;
  }
  return { values };
}

// the service's refusal in words, and the field it is about: an invalid_request names each field it
// refuses (details.errors[].field, such as "body.max_faces") with the reason
function settingsRefusal(err, prefix, fields = COLLECTION_SETTINGS) {
  const errors = err.code === "invalid_request" && Array.isArray(err.details.errors) ? err.details.errors : [];
  let field = null;
  const reasons = [];
  for (const problem of errors) {
    const known = fields.find(([key]) => problem.field === `body.${key}`);
    if (known && !field) field = `${prefix}-${known[1]}`;
    reasons.push(`${known ? fieldLabel(`${prefix}-${known[1]}`) : problem.field}: ${problem.message}`);
  }
  const message = reasons.length ? `${ERROR_MESSAGES.invalid_request} ${reasons.join("; ")}. [${err.code}]` : err.readable;
  return { message, field };
}

const fieldLabel = (id) => $(id).labels[0].textContent;

function dialogRefused(prefix, message, field) {
  say($(`${prefix}-error`), message, "error");
  if (field) $(field).focus();
  $(`${prefix}-error`).scrollIntoView({ block: "nearest" }); // a phone's dialog scrolls: the reason stays in sight
}

function openNewCollection() {
  $("collection-form").reset();
  say($("collection-error"), "");
  $("collection-dialog").showModal();
  $("collection-name").focus();
}

const NEW_COLLECTION_FIELDS = [["name", "name"], ...COLLECTION_SETTINGS, ["keep_crops", "keep-crops"]];

async function createCollection(event) {
  event.preventDefault();
  const name = $("collection-name").value.trim();
  if (!name) return dialogRefused("collection", "Give the collection a name.", "collection-name");
  const typed = typedSettings("collection");
  if (typed.problem) return dialogRefused("collection", typed.problem, typed.field);
  // only the settings filled in: the others are the service's defaults; the service checks the numbers
  const body = { name };
  for (const [key, value] of Object.entries(typed.values)) if (value !== null) body[key] = value;
  if ($("collection-keep-crops").checked) body.keep_crops = true; // unticked: not sent (the default, false)
  say($("collection-error"), "Creating...");
  try {
    const made = await api("collections", { method: "POST", json: body, action: "create collections" });
    $("collection-dialog").close();
    await loadCollections();
    chooseCollection(made.name);
    const crops = made.keep_crops ? " (it keeps each face's crop)" : "";
    say($("collection-status"), `Collection "${made.name}" created${crops}; the pages now work in it.`, "ok");
  } catch (err) {
    let { message, field } = settingsRefusal(err, "collection", NEW_COLLECTION_FIELDS);
    if (err.code === "crop_key_missing") { // the service has no crop key: say what the admin can do here
      message = `${ERROR_MESSAGES.crop_key_missing} Nothing was created: untick "Keep each face's crop", or ask the service's operator for a crop key. [${err.code}]`;
      field = "collection-keep-crops";
    }
    const named = ["invalid_collection_name", "collection_exists"].includes(err.code) ? "collection-name" : field;
    dialogRefused("collection", message, named);
  }
}

// Collection settings (admins): the dialog shows the chosen collection's settings as GET
// /collections/{name} has them, and Save sends PATCH with only the settings changed (empty: null, the
// default); the service's refusal is shown in the dialog, which stays open, on the field it names.
const settings = { name: null, stored: {} };

async function openSettings() {
  const name = collection();
  say($("settings-status"), "");
  let info;
  try {
    info = await api(`collections/${encodeURIComponent(name)}`, { action: `see ${quoted(name)}` });
  } catch (err) {
    return say($("settings-status"), err.readable, "error");
  }
  Object.assign(settings, { name, stored: {} });
  for (const [key, field] of COLLECTION_SETTINGS) {
    const value = typeof info[key] === "number" ? info[key] : null;
    settings.stored[key] = value;
    $(`settings-${field}`).value = value === null ? "" : String(value);
  }
  $("settings-title").textContent = `Settings of ${quoted(name)}`;
  say($("settings-error"), "");
  $("settings-save").disabled = false;
  $("settings-dialog").showModal();
  $("settings-retention").focus();
}

async function saveSettings(event) {
  event.preventDefault();
  const typed = typedSettings("settings");
  if (typed.problem) return dialogRefused("settings", typed.problem, typed.field);
  const name = settings.name;
  const body = {};
  for (const [key, value] of Object.entries(typed.values)) if (value !== settings.stored[key]) body[key] = value;
  if (!Object.keys(body).length) {
    $("settings-dialog").close();
    return say($("settings-status"), `Nothing changed in ${quoted(name)}.`);
  }
  say($("settings-error"), "Saving...");
  $("settings-save").disabled = true;
  try {
    const r = await api(`collections/${encodeURIComponent(name)}`, { method: "PATCH", json: body,
      action: `change the settings of ${quoted(name)}` });
    $("settings-dialog").close();
    const saved = COLLECTION_SETTINGS.filter(([key]) => key in body).map(([key, , label]) => `${label}: ${settingText(key, r[key])}`);
    say($("settings-status"), `Saved ${quoted(r.name)}. ${saved.join("; ")}.`, "ok");
    refreshStatus();
  } catch (err) {
    const { message, field } = settingsRefusal(err, "settings");
    if (!$("settings-dialog").open) return say($("settings-status"), message, "error"); // closed meanwhile (Escape)
    const first = COLLECTION_SETTINGS.find(([key]) => key in body); // else the first setting sent
    dialogRefused("settings", message, field || `settings-${first[1]}`);
  } finally {
    $("settings-save").disabled = false;
  }
}

async function confirmDeleteCollection() {
  const name = collection();
  const status = $("collection-status");
  let info;
  try {
    info = await api(`collections/${encodeURIComponent(name)}`, { action: `see ${quoted(name)}` });
  } catch (err) {
    return say(status, err.readable, "error");
  }
  const dialog = $("collection-delete-dialog");
  $("collection-delete-text").textContent = `Delete collection "${name}" with its ${info.identities} identit${info.identities === 1 ? "y" : "ies"} and ${info.faces} face(s)? Every one of them is erased and can never be identified again. This cannot be undone.`;
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "delete") return;
    try {
      const r = await api(`collections/${encodeURIComponent(name)}`, { method: "DELETE", action: "delete collections" });
      await loadCollections();
      chooseCollection(collection());
      say(status, `Deleted collection "${r.name}" (${r.deleted_identities} identities, ${r.deleted_faces} face(s)).`, "ok");
    } catch (err) {
      say(status, err.readable, "error");
    }
  };
  dialog.showModal();
}

// --- pages -------------------------------------------------------------------------------------
let statusTimer = null;

function route() {
  if (switches) return; // a key switch is under way: its end draws the page chosen (refreshSession)
  const name = window.location.hash.slice(1);
  let page = PAGES.includes(name) ? name : "try";
  if (ADMIN_PAGES.has(page) && !session.admin) page = "try";
  for (const other of PAGES) $(`page-${other}`).hidden = other !== page;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.page === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  clearInterval(statusTimer);
  if (page !== "keys") hideSecret(); // shown once: leaving the page forgets it (leaving the console: pagehide)
  if (page === "gallery") loadGalleryView();
  if (page === "keys") loadKeys();
  if (page === "audit") loadAudit();
  if (page === "status") {
    refreshStatus();
    statusTimer = setInterval(refreshStatus, 5000);
  }
}

// --- Try: every face with its box, landmarks and best identity ---------------------------------
function loadImage(file) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot show this file"));
    img.src = URL.createObjectURL(file);
  });
}

// /identify and /detect see the same photo with the same detector: pair their faces by box
function matchResult(face, results) {
  let best = null;
  let bestDistance = Infinity;
  for (const result of results) {
    if (!result.face || !result.face.box) continue;
    const d = result.face.box.reduce((sum, v, i) => sum + Math.abs(v - face.box[i]), 0);
    if (d < bestDistance) [best, bestDistance] = [result, d];
  }
  return bestDistance < 4 ? best : null;
}

function decision(result, threshold) {
  if (!result) return { known: false, text: "not identified" };
  const limit = typeof result.threshold === "number" ? result.threshold : threshold;
  const best = result.candidates && result.candidates[0];
  if (result.known) {
    return { known: true, name: result.identity_id, text: iso`${result.identity_id}: score ${fmt(result.score)} >= threshold ${fmt(limit)}, match` };
  }
  const closest = best ? iso`closest ${best.identity_id}, score ${fmt(best.score)}` : "gallery is empty";
  return { known: false, text: iso`unknown (${closest} < threshold ${fmt(limit)})` };
}

// a face's quality (from /detect): its score and, when it misses a limit, which and by how much
function qualityText(q) {
  if (!q) return "";
  const score = q.score === null ? "quality: limits only" : `quality ${fmt(q.score, 2)}`;
  if (q.passed) return `${score}, good enough to enroll`;
  const why = q.failed.map((f) => `${f.part} ${fmt(f.value, 2)} (limit ${fmt(f.limit, 2)})`).join(", ");
  return `${score}, too low to enroll: ${why}`;
}

function qualityNote(q) {
  return el("span", { class: q && !q.passed ? "quality low" : "quality", "data-score": q && q.score !== null ? String(q.score) : "",
    text: q ? ` - ${qualityText(q)}` : "" });
}

function drawFaces(canvas, img, image, faces) {
  // fill the column, small photos enlarged too, but never taller than most screens
  const room = canvas.parentElement.clientWidth || 640;
  const scale = Math.min(room / image.width, 560 / image.height, 4);
  canvas.width = Math.round(image.width * scale);
  canvas.height = Math.round(image.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  const line = Math.max(3, Math.round(canvas.width / 250));
  const drawn = [];
  faces.forEach((face, i) => {
    const [x, y, w, h] = face.box.map((v) => v * scale);
    const color = face.verdict.known ? COLORS.known : COLORS.unknown;
    ctx.lineWidth = line;
    ctx.strokeStyle = color;
    ctx.strokeRect(x, y, w, h);
    ctx.fillStyle = COLORS.landmark;
    for (const [lx, ly] of face.landmarks) {
      ctx.beginPath();
      ctx.arc(lx * scale, ly * scale, Math.max(2.5, line * 0.9), 0, 2 * Math.PI);
      ctx.fill();
    }
    drawn.push({ box: [x, y, w, h], landmarks: face.landmarks.map(([a, b]) => [a * scale, b * scale]), known: face.verdict.known });
  });
  // labels last, each where it hides no earlier label: above the box, else below it, else inside
  ctx.font = "bold 14px system-ui, sans-serif";
  const placed = [];
  faces.forEach((face, i) => {
    const [x, y, w, h] = drawn[i].box;
    const label = `${i + 1} ${face.verdict.name || "?"}`;
    const width = ctx.measureText(label).width + 8;
    const overlaps = (top) => placed.some((r) => x < r.x + r.w && r.x < x + width && top < r.y + 20 && r.y < top + 20);
    const top = [y - 20 - line / 2, y + h + line / 2, y + line / 2].find((t) => t >= 0 && t + 20 <= canvas.height && !overlaps(t));
    const labelY = top === undefined ? Math.max(0, y - 20) : top;
    placed.push({ x, y: labelY, w: width });
    ctx.fillStyle = face.verdict.known ? COLORS.known : COLORS.unknown;
    ctx.fillRect(x - line / 2, labelY, width, 20);
    ctx.fillStyle = "#111";
    ctx.fillText(label, x + 4 - line / 2, labelY + 15);
  });
  // what was drawn where, in canvas pixels: for tests and for anyone inspecting the page
  canvas.dataset.scale = String(scale);
  canvas.dataset.faces = JSON.stringify(drawn);
  canvas.dataset.lineWidth = String(line);
  canvas.setAttribute("aria-label", faces.length
    ? `Photo with ${faces.length} face(s): ` + faces.map((f, i) => `face ${i + 1} ${f.verdict.name || "unknown"}`).join(", ")
    : "Photo without faces");
}

// "Only among": the identity ids typed (comma-separated, each once, in order), null when empty; or
// why they cannot be sent (checked here: the service's invalid_request would not say which id)
const MAX_AMONG = 1000;

function amongIds() {
  const ids = [...new Set($("try-among").value.split(",").map((id) => id.trim()).filter(Boolean))];
  if (!ids.length) return { ids: null };
  if (ids.length > MAX_AMONG) return { problem: `Only among: at most ${MAX_AMONG} identity ids, not ${ids.length}.` };
  const bad = ids.find((id) => id.includes("/") || [...id].length > 128); // characters, as the service counts
  if (bad) return { problem: `Only among: ${JSON.stringify(bad.length > 40 ? `${bad.slice(0, 40)}...` : bad)}: ${ERROR_MESSAGES.invalid_identity_id}` };
  return { ids };
}

let tryFile = null; // the photo shown: Enter in "Only among" asks about it again
let tryRun = 0; // the latest ask: an earlier one answered later is not drawn over it

async function tryPhoto(file) {
  const status = $("try-status");
  const list = $("try-results");
  const canvas = $("try-canvas");
  const run = ++tryRun;
  tryFile = file;
  list.replaceChildren();
  delete canvas.dataset.faces;
  delete list.dataset.among;
  const among = amongIds();
  if (among.problem) {
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.state = "error";
    return say(status, among.problem, "error");
  }
  canvas.dataset.state = "busy";
  say(status, `Looking for faces in ${file.name}...`);
  const detect = api("detect", { method: "POST", form: photoForm({}, [["images", file]]) });
  const fields = { image_type: "photo", multi_face: "all", top_k: 3 };
  if (among.ids) fields.among = JSON.stringify(among.ids); // a form's list field: JSON text, as the service reads it
  const where = collection();
  const identify = api(inCollection(where, "identify"), {
    method: "POST",
    form: photoForm(fields, [["images", file]]),
    action: `identify in ${quoted(where)}`,
  }).catch((err) => err);
  const shown = loadImage(file).catch((err) => err);
  let detected;
  let img;
  try {
    detected = await detect; // the service's verdict on the file comes first (not_an_image, ...)
    img = await shown;
    if (img instanceof Error) throw img;
  } catch (err) {
    if (run !== tryRun) return;
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.state = "error";
    say(status, err instanceof ApiError ? err.readable : `This file cannot be shown: ${err.message}`, "error");
    return;
  }
  const identified = await identify;
  if (run !== tryRun) return;
  const results = identified instanceof ApiError ? [] : identified.results;
  const threshold = identified instanceof ApiError ? null : identified.threshold;
  const image = detected.images[0];
  const faces = image.faces.map((face) => ({ ...face, verdict: decision(matchResult(face, results), threshold) }));
  drawFaces(canvas, img, image, faces);
  faces.forEach((face, i) => {
    list.append(el("li", { class: face.verdict.known ? "known" : "unknown" },
      el("strong", { text: `Face ${i + 1}` }), " ", ...[face.verdict.text].flat(),
      el("span", { class: "muted", text: ` (detector ${fmt(face.score, 2)})` }), qualityNote(face.quality)));
  });
  canvas.dataset.state = "done";
  if (identified instanceof ApiError && identified.code !== "no_face") {
    say(status, `Faces found, but identification failed: ${identified.readable}`, "error");
  } else if (!faces.length) {
    say(status, ERROR_MESSAGES.no_face + " [no_face]", "error");
  } else {
    const known = faces.filter((f) => f.verdict.known).length;
    const limited = among.ids && !(identified instanceof ApiError);
    say(status, `${faces.length} face(s) found, ${known} identified.${limited ? ` ${limitedText(among.ids, identified)}` : ""}`, "ok");
    if (limited) list.dataset.among = String(identified.gallery_identities);
  }
}

// limited by "Only among": the answer's gallery is the identities named (each counted once)
function limitedText(ids, identified) {
  const n = identified.gallery_identities;
  const named = ids.length > 5 ? `${ids.slice(0, 5).join(", ")} and ${ids.length - 5} more` : ids.join(", ");
  return `Limited to ${n} identit${n === 1 ? "y" : "ies"} (${named}), at the threshold of a gallery of just ${n === 1 ? "it" : "them"}.`;
}

function tryAgain(event) {
  event.preventDefault();
  if (tryFile) tryPhoto(tryFile);
  else say($("try-status"), amongIds().ids ? "Pick a photo: it is searched among these identities only." : "Pick a photo first.");
}

function setupDrop(zone, input, onFile) {
  input.addEventListener("change", () => input.files[0] && onFile(input.files[0]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) onFile(file);
  });
}

// --- Try: compare two photos -----------------------------------------------------------------------
let compareRun = 0; // the latest comparison: one answered after a newer one, or after the collection changed, is not shown
function preview(input, img) {
  input.addEventListener("change", () => {
    const file = input.files[0];
    img.hidden = !file;
    if (file) {
      img.src = URL.createObjectURL(file);
      img.alt = `Preview of ${file.name}`;
    }
  });
}

async function compare(event) {
  event.preventDefault();
  const out = $("compare-result");
  const a = $("compare-a").files[0];
  const b = $("compare-b").files[0];
  if (!a || !b) return say(out, "Pick two photos first.", "error");
  const run = ++compareRun;
  say(out, "Comparing...");
  out.removeAttribute("data-similarity");
  try {
    const where = collection();
    const r = await api(inCollection(where, "verify"), {
      method: "POST",
      form: photoForm({ image_type: "photo" }, [["image_a", a], ["image_b", b]]),
      action: `verify in ${quoted(where)}`,
    });
    if (run !== compareRun) return;
    const meter = el("div", { class: "meter", "aria-hidden": "true" },
      el("div", { class: r.match ? "fill known" : "fill unknown" }), el("div", { class: "mark" }));
    meter.firstChild.style.width = `${Math.max(0, Math.min(1, r.similarity)) * 100}%`;
    meter.lastChild.style.left = `${Math.max(0, Math.min(1, r.threshold)) * 100}%`;
    out.replaceChildren(
      el("p", { class: r.match ? "verdict known" : "verdict unknown", text: r.match ? "Same person" : "Different people" }),
      el("p", { text: `Similarity ${fmt(r.similarity)} ${r.match ? ">=" : "<"} threshold ${fmt(r.threshold)}` }),
      meter);
    out.dataset.similarity = String(r.similarity);
    out.classList.remove("error");
  } catch (err) {
    if (run === compareRun) say(out, err.readable, "error");
  }
}

// --- Enroll ------------------------------------------------------------------------------------------
let enrollReady = false;

function largest(faces) {
  return faces.reduce((best, f) => {
    const size = Math.sqrt(Math.max(f.box[2], 0) * Math.max(f.box[3], 0));
    const bestSize = best ? Math.sqrt(Math.max(best.box[2], 0) * Math.max(best.box[3], 0)) : -1;
    return size > bestSize || (size === bestSize && f.score > best.score) ? f : best;
  }, null);
}

async function previewCrops() {
  const files = [...$("enroll-files").files];
  const box = $("enroll-crops");
  enrollReady = false;
  if (!files.length) return box.replaceChildren(el("p", { class: "muted", text: "Pick photos to see the aligned faces first." }));
  box.replaceChildren(el("p", { class: "muted", text: "Finding the faces..." }));
  try {
    const r = await api("detect", {
      method: "POST",
      form: photoForm({ return_crops: true }, files.map((f) => ["images", f])),
    });
    let missing = 0;
    let low = 0;
    box.replaceChildren(...r.images.map((image, i) => {
      const face = largest(image.faces);
      if (!face) {
        missing += 1;
        return el("figure", { class: "crop missing" }, el("div", { class: "noface", text: "no face" }),
          el("figcaption", { text: `${files[i].name}: no face found` }));
      }
      if (face.quality && !face.quality.passed) low += 1;
      return el("figure", { class: face.quality && !face.quality.passed ? "crop low" : "crop" },
        el("img", { src: `data:image/png;base64,${face.crop}`, alt: `Aligned face from ${files[i].name}` }),
        el("figcaption", { text: files[i].name }, qualityNote(face.quality)));
    }));
    enrollReady = missing === 0;
    if (missing) say($("enroll-status"), `${ERROR_MESSAGES.no_face} Remove or replace the photo(s) marked "no face".`, "error");
    else if (low) say($("enroll-status"), `${ERROR_MESSAGES.low_quality} Replace the photo(s) whose quality is too low.`, "error");
    else say($("enroll-status"), `${files.length} face(s) ready to store.`);
  } catch (err) {
    box.replaceChildren();
    say($("enroll-status"), err.readable, "error");
  }
}

async function enroll(event) {
  event.preventDefault();
  const status = $("enroll-status");
  const identity = $("enroll-id").value.trim();
  const files = [...$("enroll-files").files];
  const metadataText = $("enroll-metadata").value.trim();
  if (!identity || !files.length) return say(status, "Give a name and at least one photo.", "error");
  if (!enrollReady) return say(status, "Every photo needs a face before saving.", "error");
  const fields = { identity_id: identity, image_type: "photo", replace: document.querySelector("input[name=mode]:checked").value === "replace" };
  if (metadataText) {
    try {
      const metadata = JSON.parse(metadataText);
      if (typeof metadata !== "object" || metadata === null || Array.isArray(metadata)) throw new Error("not an object");
      fields.metadata = JSON.stringify(metadata);
    } catch (err) {
      return say(status, `Metadata must be a JSON object (${err.message}).`, "error");
    }
  }
  say(status, "Saving...");
  $("enroll-save").disabled = true;
  try {
    const where = collection();
    const r = await api(inCollection(where, "enroll"), { method: "POST", form: photoForm(fields, files.map((f) => ["images", f])),
      action: `enroll into ${quoted(where)}` });
    const what = r.created ? "new identity" : r.faces_replaced ? `replaced ${r.faces_replaced} face(s)` : "added";
    // a clean form: saving the same photos twice by accident would enroll them twice
    $("enroll-form").reset();
    enrollReady = false;
    $("enroll-crops").replaceChildren(el("p", { class: "muted", text: "Pick photos to see the aligned faces first." }));
    say(status, iso`Saved ${r.identity_id} in ${quoted(where)}: ${r.face_ids.length} face(s) stored (${what}); ${r.face_count} face(s) in total.`, "ok");
  } catch (err) {
    say(status, err.readable, "error");
  } finally {
    $("enroll-save").disabled = false;
  }
}

// --- Gallery -----------------------------------------------------------------------------------------
const gallery = { cursors: [null], page: 0, next: null, query: "", limit: 20 };
let galleryRun = 0; // the latest list asked for: an earlier one answered later is not drawn over it

async function loadGallery() {
  const status = $("gallery-status");
  const body = $("gallery-table").tBodies[0];
  const where = collection();
  const run = ++galleryRun;
  const current = () => run === galleryRun && where === collection();
  say(status, "Loading...");
  try {
    // a search is the ids that start with the query (prefix=: a range of the id index), paged as the rest
    const cursor = gallery.cursors[gallery.page];
    const page = await api(inCollection(where, `identities?limit=${gallery.limit}`
      + (gallery.query ? `&prefix=${encodeURIComponent(gallery.query)}` : "")
      + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : "")),
    { action: `list the identities of ${quoted(where)}` });
    if (!current()) return; // the collection changed, or a newer list was asked for, meanwhile
    gallery.next = page.next_cursor;
    body.replaceChildren(...page.items.map((item) => galleryRow(item, where)));
    $("gallery-prev").disabled = gallery.page === 0;
    $("gallery-next").disabled = !gallery.next;
    $("gallery-page").textContent = (gallery.query ? `ids starting with "${gallery.query}", ` : "") + `page ${gallery.page + 1}`;
    $("gallery-title").textContent = `Gallery: ${quoted(where)}`;
    say(status, page.items.length ? `${page.items.length} identit${page.items.length === 1 ? "y" : "ies"} shown.` : "No identities.");
  } catch (err) {
    if (current()) say(status, err.readable, "error");
  }
}

// a row of collection `where`: its buttons act there
function galleryRow(item, where) {
  const metadata = item.metadata && Object.keys(item.metadata).length ? jsonParts(item.metadata) : "";
  const faces = el("button", { type: "button", class: "ghost small", text: "Faces", "aria-label": `Faces of ${item.identity_id}` });
  faces.addEventListener("click", () => showIdentity(item.identity_id, where));
  const buttons = [faces];
  if (canWrite()) { // a read key sees the identities, not the buttons that change them
    const edit = el("button", { type: "button", class: "ghost small", text: "Edit", "aria-label": `Edit ${item.identity_id}`,
      "data-action": "edit" });
    edit.addEventListener("click", () => openEdit(item.identity_id, where));
    const remove = el("button", { type: "button", class: "danger small", text: "Delete", "aria-label": `Delete ${item.identity_id}` });
    remove.addEventListener("click", () => confirmDelete(item, where));
    buttons.unshift(remove, edit); // Delete stays first, where it always was
  }
  return el("tr", { "data-id": item.identity_id },
    el("th", { scope: "row", text: item.identity_id }),
    el("td", { text: String(item.face_count) }),
    el("td", { class: "meta", text: metadata }),
    el("td", { text: item.updated_at ? new Date(item.updated_at * 1000).toLocaleString() : "" }),
    el("td", { class: "row-actions" }, ...buttons));
}

function confirmDelete(item, where) {
  const dialog = $("delete-dialog");
  setText($("delete-text"), iso`Delete "${item.identity_id}" and its ${item.face_count} face(s)? It can never be identified again. This cannot be undone.`);
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "delete") return;
    try {
      const r = await api(inCollection(where, `identities/${encodeURIComponent(item.identity_id)}`), { method: "DELETE",
        action: `delete identities in ${quoted(where)}` });
      await loadGallery();
      say($("gallery-status"), iso`Deleted ${r.identity_id}${elsewhere(where)} (${r.deleted_faces} face(s)).`, "ok");
    } catch (err) {
      say($("gallery-status"), err.readable, "error");
    }
  };
  dialog.showModal();
}

// --- Gallery hygiene: duplicates, outliers; merge identities, move or delete a face ------------------
// a duplicates scan job and GET /outliers find the suspects; POST identities/{id}/merge, POST faces/{id}/move
// and DELETE faces/{id} fix them, and POST faces/delete erases the outliers ticked, each after a
// confirmation. Faces are shown by id, identity and score; a collection made with keep_crops also keeps
// each face's aligned crop, and there a key that may change the gallery sees it as a thumbnail next to
// the face (GET faces/{id}/crop, below). Elsewhere the service keeps embeddings only, no photo.
// identity: the one whose faces the panel shows (or is loading); shown: what the panel has drawn, and
// the collection it came from (its buttons act there)
const hygiene = { view: "identities", identity: null, shown: null };
const VIEWS = ["identities", "duplicates", "outliers"];

// a read key sees the lists; the buttons that change the gallery are for write and admin keys
const canWrite = () => session.openMode || session.role === "admin" || session.role === "write";

// --- kept face crops as thumbnails -----------------------------------------------------------------
// Shown only where the collection keeps crops (keep_crops) and the key may change the gallery (the
// crop route needs the write permission, as the Move and Delete buttons do): otherwise no thumbnail is
// drawn and no crop is asked for. Each crop is fetched through api() (an <img src> could not send the
// API key) and shown from an object URL. Thumbnails are asked for only once they come near the screen
// (IntersectionObserver), CROP_PARALLEL at a time; one without a crop (crop_not_kept) or whose request
// fails shows a neutral placeholder, never an error. An object URL is revoked as soon as its thumbnail
// is no longer in the page (a list redrawn, a face deleted): sweepCrops().
const CROP_SIZE = 56; // CSS pixels; the crop itself is the model's input (112x112)
const CROP_PARALLEL = 4;
const crops = { waiting: [], running: 0, live: new Map(), watched: new Set(), observer: null };

const showsCrops = (where) => canWrite() && session.keepCrops.has(where);

function cropObserver() {
  if (!crops.observer && "IntersectionObserver" in window) {
    crops.observer = new IntersectionObserver((entries) => {
      for (const entry of entries) {
        if (!entry.isIntersecting) continue;
        crops.observer.unobserve(entry.target);
        crops.watched.delete(entry.target);
        queueCrop(entry.target);
      }
    }, { rootMargin: "200px 0px" });
  }
  return crops.observer;
}

// a face's thumbnail, to put in a list of collection `where` being drawn (null where crops are not
// shown): an empty box until its crop comes
function cropThumb(faceId, identity, where) {
  if (!showsCrops(where)) return null;
  const label = `face ${faceId} of ${identity}`;
  const thumb = el("span", { class: "face-crop", "aria-label": label, "data-face-id": String(faceId), "data-state": "waiting" });
  thumb.setAttribute("role", "img"); // until its crop comes: then the <img> and its alt text
  thumb.dataset.alt = label;
  thumb.dataset.path = inCollection(where, `faces/${encodeURIComponent(faceId)}/crop`);
  const observer = cropObserver();
  if (observer) {
    crops.watched.add(thumb);
    observer.observe(thumb);
  } else queueMicrotask(() => queueCrop(thumb)); // no observer (an old browser): all, still CROP_PARALLEL at a time
  return thumb;
}

function queueCrop(thumb) {
  crops.waiting.push(thumb);
  pumpCrops();
}

function pumpCrops() {
  while (crops.running < CROP_PARALLEL && crops.waiting.length) {
    const thumb = crops.waiting.shift();
    if (!thumb.isConnected) continue; // its list was redrawn meanwhile
    crops.running += 1;
    loadCrop(thumb).finally(() => {
      crops.running -= 1;
      pumpCrops();
    });
  }
}

async function loadCrop(thumb) {
  thumb.dataset.state = "loading";
  let blob;
  try {
    blob = await api(thumb.dataset.path, { blob: true, action: "see the faces' kept crops" });
  } catch (err) {
    return cropMissing(thumb, err.code);
  }
  if (!thumb.isConnected) return; // gone while it loaded: no object URL made
  const url = URL.createObjectURL(blob);
  const img = el("img", { src: url, alt: thumb.dataset.alt, width: CROP_SIZE, height: CROP_SIZE, decoding: "async" });
  crops.live.set(url, img);
  img.addEventListener("error", () => cropMissing(thumb, "not_an_image"));
  thumb.removeAttribute("role"); // the image itself carries the name now
  thumb.removeAttribute("aria-label");
  thumb.replaceChildren(img);
  thumb.dataset.state = "shown";
}

function cropMissing(thumb, code) {
  thumb.replaceChildren();
  sweepCrops();
  thumb.dataset.state = "missing";
  thumb.dataset.code = code;
  thumb.setAttribute("role", "img");
  thumb.setAttribute("aria-label", `${thumb.dataset.alt} (no crop to show)`);
  thumb.title = code === "crop_not_kept" ? "No crop is kept of this face." : "The face's crop could not be shown.";
}

// after a list is redrawn or a row removed: the object URLs of thumbnails no longer in the page are
// revoked, and their crops are no longer waited for
function sweepCrops() {
  for (const [url, img] of crops.live) {
    if (img.isConnected) continue;
    URL.revokeObjectURL(url);
    crops.live.delete(url);
  }
  for (const thumb of crops.watched) {
    if (thumb.isConnected) continue;
    crops.observer.unobserve(thumb);
    crops.watched.delete(thumb);
  }
  crops.waiting = crops.waiting.filter((thumb) => thumb.isConnected);
}

// a list's new rows in place of the old ones, the old thumbnails' object URLs revoked
function replaceRows(list, rows) {
  list.replaceChildren(...rows);
  sweepCrops();
}

function setupHygiene() {
  for (const view of VIEWS) $(`view-${view}`).addEventListener("click", () => showGalleryView(view));
  $("duplicates-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadDuplicates();
  });
  $("outliers-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadOutliers();
  });
  $("outliers-list").addEventListener("change", showOutlierSelection); // a face's checkbox
  $("outliers-select-all").addEventListener("change", (event) => {
    for (const box of outlierBoxes()) box.checked = event.target.checked;
    showOutlierSelection();
  });
  $("outliers-delete-selected").addEventListener("click", askDeleteSelected);
  $("identity-close").addEventListener("click", () => {
    hygiene.identity = null;
    hygiene.shown = null;
    identityRun += 1; // its faces still coming are not shown
    $("gallery-identity").hidden = true;
    replaceRows($("identity-faces").tBodies[0], []); // its thumbnails' object URLs revoked
  });
  $("identity-merge").addEventListener("click", () => hygiene.shown && askMerge(hygiene.shown.where, hygiene.shown.identity));
  $("identity-edit").addEventListener("click", () => hygiene.shown && openEdit(hygiene.shown.identity, hygiene.shown.where));
  $("edit-form").addEventListener("submit", saveEdit);
  $("edit-cancel").addEventListener("click", () => $("edit-dialog").close());
  $("edit-dialog").addEventListener("close", () => {
    if (editing.opener && editing.opener.isConnected) editing.opener.focus(); // back where the edit began
  });
  $("hygiene-confirm").addEventListener("click", (event) => {
    if (!$("hygiene-target-field").hidden && !$("hygiene-target").value.trim()) {
      event.preventDefault(); // no target typed yet: the dialog stays open
      say($("hygiene-error"), "Type the identity id first.", "error");
    }
  });
}

function resetHygiene() {
  hygiene.identity = null;
  hygiene.shown = null;
  identityRun += 1; // an identity's faces still coming are of the collection left: not shown
  $("gallery-identity").hidden = true;
  $("identity-faces").tBodies[0].replaceChildren();
  $("duplicates-list").replaceChildren();
  $("outliers-list").replaceChildren();
  delete $("outliers-list").dataset.collection;
  sweepCrops(); // the thumbnails of the collection left: object URLs revoked
  showOutlierSelection();
}

function showGalleryView(view) {
  hygiene.view = view;
  loadGalleryView();
}

function loadGalleryView() {
  for (const view of VIEWS) {
    $(`gallery-${view}`).hidden = view !== hygiene.view;
    $(`view-${view}`).setAttribute("aria-pressed", String(view === hygiene.view));
  }
  if (hygiene.view !== "identities") $("gallery-identity").hidden = true;
  if (hygiene.view === "identities") {
    loadGallery();
    if (hygiene.identity) showIdentity(hygiene.identity, collection());
  }
  if (hygiene.view === "duplicates") loadDuplicates();
  if (hygiene.view === "outliers") loadOutliers();
}

// after a change: what the page shows is read again
async function refreshHygiene() {
  if (hygiene.view === "identities") {
    await loadGallery();
    if (hygiene.identity) await showIdentity(hygiene.identity, collection());
    else $("gallery-identity").hidden = true; // its identity is gone
  }
  if (hygiene.view === "duplicates") await loadDuplicates(false);
  if (hygiene.view === "outliers") await loadOutliers(false);
}

// a confirmation (and, with askTarget, the identity to act on): resolves to the target ("" without
// one) or null when cancelled
function confirmHygiene({ title, text, confirm, askTarget = false, target = "" }) {
  const dialog = $("hygiene-dialog");
  $("hygiene-title").textContent = title;
  setText($("hygiene-text"), text);
  $("hygiene-confirm").textContent = confirm;
  $("hygiene-target-field").hidden = !askTarget;
  $("hygiene-target").value = target;
  say($("hygiene-error"), "");
  dialog.returnValue = "";
  return new Promise((resolve) => {
    const done = () => {
      dialog.removeEventListener("close", done);
      if (dialog.returnValue === "ok") resolve(askTarget ? $("hygiene-target").value.trim() : "");
      else resolve(null);
    };
    dialog.addEventListener("close", done);
    dialog.showModal();
    if (askTarget) $("hygiene-target").focus();
  });
}

const galleryStatus = (message, kind = "") => say($("gallery-status"), message, kind);

async function askMerge(where, source, target = "") {
  const into = target || await confirmHygiene({
    title: "Merge into another identity?", confirm: "Choose and merge", askTarget: true,
    text: iso`Every face of "${source}" becomes a face of the identity typed below, and "${source}" is deleted. The target keeps its own metadata.`,
  });
  if (!into) return;
  if (target) {
    const ok = await confirmHygiene({ title: "Merge identities?", confirm: "Merge",
      text: iso`Merge "${source}" into "${target}"? Every face of "${source}" becomes a face of "${target}", and "${source}" is deleted. This cannot be undone.` });
    if (ok === null) return;
  }
  try {
    const r = await api(inCollection(where, `identities/${encodeURIComponent(source)}/merge`), { method: "POST", json: { into },
      action: `merge identities in ${quoted(where)}` });
    if (where === collection() && hygiene.identity === source) hygiene.identity = r.identity_id;
    await refreshHygiene();
    galleryStatus(iso`Merged ${r.merged_from} into ${r.identity_id}${elsewhere(where)}: ${r.faces_moved} face(s) moved, it now has ${r.face_count}.`, "ok");
  } catch (err) {
    galleryStatus(err.readable, "error");
  }
}

async function askMove(where, faceId, from, target = "") {
  const to = await confirmHygiene({
    title: "Move this face?", confirm: "Move", askTarget: !target, target,
    text: target
      ? iso`Move face ${faceId} from "${from}" to "${target}"? The face keeps its id; if it is the last face of "${from}", that identity is deleted.`
      : iso`Move face ${faceId} of "${from}" to the identity typed below (created if it is not enrolled). If it is the last face of "${from}", that identity is deleted.`,
  });
  if (to === null) return;
  try {
    const r = await api(inCollection(where, `faces/${encodeURIComponent(faceId)}/move`), { method: "POST",
      json: { identity_id: target || to }, action: `move faces in ${quoted(where)}` });
    if (where === collection() && r.source_deleted && hygiene.identity === r.from_identity) hygiene.identity = r.to_identity;
    await refreshHygiene();
    galleryStatus(iso`Moved face ${r.face_id} from ${r.from_identity} to ${r.to_identity}${elsewhere(where)}${
      r.target_created ? " (a new identity)" : ""}${r.source_deleted ? iso`; ${r.from_identity} had no face left and was deleted` : ""}.`, "ok");
  } catch (err) {
    galleryStatus(err.readable, "error");
  }
}

async function askDeleteFace(where, faceId, identity) {
  const ok = await confirmHygiene({ title: "Delete this face?", confirm: "Delete face",
    text: iso`Delete face ${faceId} of "${identity}"? It is erased and can never be matched again; if it is the identity's last face, the identity is deleted too. This cannot be undone.` });
  if (ok === null) return;
  try {
    const r = await api(inCollection(where, `faces/${encodeURIComponent(faceId)}`), { method: "DELETE",
      action: `delete faces in ${quoted(where)}` });
    if (where === collection() && r.identity_deleted && hygiene.identity === r.identity_id) hygiene.identity = null;
    await refreshHygiene();
    galleryStatus(iso`Deleted face ${r.face_id} of ${r.identity_id}${elsewhere(where)}${r.identity_deleted ? "; it was its last face, so the identity was deleted too" : ""}.`, "ok");
  } catch (err) {
    galleryStatus(err.readable, "error");
  }
}

function actionButton(text, label, onClick, kind = "ghost small") {
  const button = el("button", { type: "button", class: kind, text, "aria-label": label });
  button.addEventListener("click", onClick);
  return button;
}

// one identity's faces (of collection `where`), each with Move and Delete, which act there; an answer
// that comes after the collection or the view changed, the panel was closed or another identity was
// asked for, is not shown
let identityRun = 0;

async function showIdentity(identityId, where) {
  hygiene.identity = identityId;
  const run = ++identityRun;
  const current = () => run === identityRun && where === collection() && hygiene.view === "identities";
  const panel = $("gallery-identity");
  try {
    const r = await api(inCollection(where, `identities/${encodeURIComponent(identityId)}`),
      { action: `read identities of ${quoted(where)}` });
    if (!current()) return;
    hygiene.shown = { identity: r.identity_id, where };
    setText($("identity-title"), iso`Faces of ${r.identity_id}`);
    $("identity-summary").textContent = `${r.face_count} face(s). ` + (showsCrops(where)
      ? "Each is shown with the crop the collection keeps of it (the face the model saw)."
      : session.keepCrops.has(where)
        ? "Faces are listed by id: the collection keeps their crops, but only keys that may change the gallery see them."
        : "The collection keeps embeddings, not photos: faces are listed by id.");
    setText($("identity-metadata"), r.metadata && Object.keys(r.metadata).length ? jsonParts(r.metadata) : "none");
    const write = canWrite();
    $("identity-merge").hidden = !write;
    $("identity-edit").hidden = !write;
    replaceRows($("identity-faces").tBodies[0], r.face_ids.map((faceId) => el("tr", { "data-id": String(faceId) },
      el("th", { scope: "row", class: "mono" },
        el("span", { class: "face-label" }, cropThumb(faceId, r.identity_id, where), String(faceId))),
      el("td", { class: "row-actions" }, ...(write ? [
        actionButton("Move", `Move face ${faceId}`, () => askMove(where, faceId, r.identity_id)),
        actionButton("Delete face", `Delete face ${faceId}`, () => askDeleteFace(where, faceId, r.identity_id), "danger small"),
      ] : [])))));
    panel.hidden = false;
  } catch (err) {
    if (!current()) return;
    if (err.code === "identity_not_found") hygiene.identity = null;
    hygiene.shown = null;
    panel.hidden = true;
    galleryStatus(err.readable, "error");
  }
}

// --- Gallery: edit an identity (PATCH identities/{id}): rename it, replace its metadata -------------
// The dialog sends only what changed: identity_id when the id differs, metadata (the whole object, which
// replaces the stored one) when the JSON means something else than what the service gave. Invalid JSON
// is refused here; the service's refusals (identity_exists, invalid_identity_id, invalid_metadata,
// metadata_too_large) are shown in the dialog, which stays open.
const editing = { identity: null, where: null, metadata: {}, updatedAt: null, opener: null };

// the same JSON value, whatever the order of the keys
function sameJson(a, b) {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const keys = Object.keys(a);
  return keys.length === Object.keys(b).length
    && keys.every((key) => Object.prototype.hasOwnProperty.call(b, key) && sameJson(a[key], b[key]));
}

// the identity of collection `where` (its row's or panel's): the dialog saves it there
async function openEdit(identityId, where) {
  const opener = document.activeElement;
  let r;
  try { // read afresh: the metadata sent back replaces the stored one, so it must be the stored one
    r = await api(inCollection(where, `identities/${encodeURIComponent(identityId)}`),
      { action: `read identities of ${quoted(where)}` });
  } catch (err) {
    return where === collection() && galleryStatus(err.readable, "error");
  }
  if (where !== collection()) return; // the collection changed while it was read: no dialog for the one left
  Object.assign(editing, { identity: r.identity_id, where, metadata: r.metadata || {}, updatedAt: r.updated_at, opener });
  setText($("edit-title"), iso`Edit ${r.identity_id}`);
  $("edit-id").value = r.identity_id;
  $("edit-metadata").value = JSON.stringify(editing.metadata, null, 2);
  say($("edit-error"), "");
  $("edit-save").disabled = false;
  $("edit-dialog").showModal();
  $("edit-id").focus();
}

function editRefused(message, field) {
  say($("edit-error"), message, "error");
  $(field).focus();
  $("edit-error").scrollIntoView({ block: "nearest" }); // a phone's dialog scrolls: the reason stays in sight
}

async function saveEdit(event) {
  event.preventDefault();
  const newId = $("edit-id").value.trim();
  const text = $("edit-metadata").value.trim();
  if (!newId) return editRefused("Give the identity an id.", "edit-id");
  let metadata = {};
  if (text) {
    try {
      metadata = JSON.parse(text);
    } catch (err) {
      return editRefused(`The metadata is not valid JSON (${err.message}); nothing was saved.`, "edit-metadata");
    }
    if (typeof metadata !== "object" || metadata === null || Array.isArray(metadata)) {
      return editRefused("The metadata must be a JSON object ({...}), not a list, text or number; nothing was saved.", "edit-metadata");
    }
  }
  const from = editing.identity;
  const where = editing.where;
  const body = {};
  if (newId !== from) body.identity_id = newId;
  if (!sameJson(metadata, editing.metadata)) body.metadata = metadata;
  if (!Object.keys(body).length) {
    $("edit-dialog").close();
    return galleryStatus(iso`Nothing changed in ${from}.`);
  }
  say($("edit-error"), "Saving...");
  $("edit-save").disabled = true;
  try { // only if nothing wrote to it since the dialog read it: the whole metadata sent must not undo a change
    const r = await api(inCollection(where, `identities/${encodeURIComponent(from)}`), { method: "PATCH",
      json: { ...body, expected_updated_at: editing.updatedAt },
      action: `edit identities in ${quoted(where)}` });
    const here = where === collection();
    if (here && hygiene.identity === from) hygiene.identity = r.identity_id;
    if (here && gallery.query && !r.identity_id.startsWith(gallery.query)) { // the search follows the new id
      Object.assign(gallery, { query: r.identity_id, page: 0, cursors: [null] });
      $("gallery-query").value = r.identity_id;
    }
    $("edit-dialog").close();
    await refreshHygiene();
    const what = [body.identity_id !== undefined ? iso`renamed from ${from}` : null, body.metadata !== undefined ? "metadata replaced" : null];
    galleryStatus(iso`Saved ${r.identity_id}${elsewhere(where)}: ${what.filter(Boolean).flatMap((part, i) => (i ? [", ", part] : [part])).flat()}.`, "ok");
    const row = [...$("gallery-table").tBodies[0].rows].find((tr) => tr.dataset.id === r.identity_id);
    const again = row && row.querySelector("button[data-action=edit]");
    if (editing.opener && !editing.opener.isConnected && again) again.focus(); // the old row was redrawn
  } catch (err) {
    if (!$("edit-dialog").open) return galleryStatus(err.readable, "error"); // closed meanwhile (Escape)
    const field = ["invalid_metadata", "metadata_too_large"].includes(err.code) ? "edit-metadata" : "edit-id";
    editRefused(err.readable, field);
  } finally {
    $("edit-save").disabled = false;
  }
}

function missingRoute(err, what) {
  return err.code === "not_found" ? `This service does not offer ${what} (an older version).` : err.readable;
}

// A scan of the whole collection as a job (POST {kind}/jobs, then GET {kind}/jobs/{id} until it
// ends): minutes at a million faces, longer than a request should wait. The done job's field named
// {kind} ("duplicates" or "outliers") is what GET /{kind} answers. The scan is of collection `where`
// and read there only (a job id means nothing in another collection). Asked again while the same scan
// runs (its view shown again, its collection chosen again), it waits for that one instead of starting
// a second job, which the service refuses (one job per collection at a time: job_running).
const scansInFlight = new Map(); // [kind, where, body] as JSON -> the scan's promise

function scanJob(kind, where, minScoreInput, waiting, announce) {
  const body = { limit: 100 };
  const score = $(minScoreInput).value.trim();
  if (score !== "") body.min_score = numberOrText(score); // not a number: as typed, the server says what is wrong
  const key = JSON.stringify([kind, where, body]);
  if (!scansInFlight.has(key)) {
    scansInFlight.set(key, runScan(kind, where, body, waiting, announce).finally(() => scansInFlight.delete(key)));
  }
  return scansInFlight.get(key);
}

// the job's answer, or null once `where` is no longer the collection chosen: polling stops (the job
// itself runs on in the service)
async function runScan(kind, where, body, waiting, announce) {
  const action = `search ${quoted(where)} for ${kind}`;
  let job = (await api(inCollection(where, `${kind}/jobs`), { method: "POST", json: body, action })).job;
  const started = Date.now();
  while (!["done", "failed", "cancelled"].includes(job.state)) {
    const waited = Date.now() - started;
    const shown = where === collection() && hygiene.view === kind;
    if (announce && shown && waited > 2000) galleryStatus(`${waiting} (${Math.round(waited / 1000)} s)`);
    await new Promise((resolve) => setTimeout(resolve, Math.min(2000, 100 + waited / 10)));
    if (where !== collection()) return null;
    job = await api(inCollection(where, `${kind}/jobs/${encodeURIComponent(job.id)}`), { action });
  }
  if (job.state !== "done") {
    const error = job.error || { code: job.state, message: `The scan was ${job.state}.` };
    throw new ApiError(error.code, error.message, 0, {}, action);
  }
  return job[kind];
}

// the latest scan asked for, of each kind: an answer (or error) is shown only while it is the latest
// of its kind, its collection is still the one chosen and its view is still shown
const scanRuns = { duplicates: 0, outliers: 0 };

function scanTicket(kind) {
  const where = collection();
  const run = ++scanRuns[kind];
  return { where, current: () => run === scanRuns[kind] && where === collection() && hygiene.view === kind };
}

// GET /duplicates's answer, through a scan job: {"pairs": [{"identity_a", "identity_b", "score",
// "false_alarm_probability", "evidence": [{"face_a", "face_b", "score"}]}], "min_score", "comparisons",
// "faces_scanned", ...}
async function loadDuplicates(announce = true) {
  const list = $("duplicates-list");
  const waiting = "Looking for duplicate people...";
  const { where, current } = scanTicket("duplicates");
  if (announce) galleryStatus(waiting);
  try {
    const r = await scanJob("duplicates", where, "duplicates-min-score", waiting, announce);
    if (!r || !current()) return; // of a collection or a view left, or a newer scan was asked for
    replaceRows(list, r.pairs.map((pair) => duplicateItem(pair, where)));
    if (announce || !r.pairs.length) {
      galleryStatus(r.pairs.length
        ? `${r.pairs.length} probable duplicate pair(s) at score >= ${fmt(r.min_score)} (${r.faces_scanned} faces scanned).`
        : `No pair of identities scores >= ${fmt(r.min_score)} (${r.faces_scanned} faces scanned).`);
    }
  } catch (err) {
    if (!current()) return;
    replaceRows(list, []);
    galleryStatus(missingRoute(err, "a duplicate search"), "error");
  }
}

// one side of a card: a heading, the face's kept crop (thumb: null where crops are not shown), lines, buttons
function side(title, lines, buttons = [], thumb = null) {
  return el("div", { class: "side" }, el("h4", { text: title }), thumb,
    ...lines.map((line) => el("p", { text: line })), buttons.length ? el("div", { class: "row-actions" }, ...buttons) : null);
}

// a pair found in collection `where`: its buttons act there
function duplicateItem(pair, where) {
  const a = pair.identity_a;
  const b = pair.identity_b;
  const faces = (key) => [...new Set(pair.evidence.map((e) => e[key]))].join(", ");
  const write = canWrite();
  const withCrops = showsCrops(where);
  // each pair of faces behind the score, with the two crops side by side where the collection keeps them
  const evidence = (e) => {
    const text = `face ${e.face_a} ~ face ${e.face_b}: ${fmt(e.score)}`;
    return withCrops
      ? el("li", { class: "with-crops" }, cropThumb(e.face_a, a, where), el("span", { class: "evidence-text", text }),
        cropThumb(e.face_b, b, where))
      : el("li", { text });
  };
  return el("li", { class: "pair-card", "data-id": `${a}|${b}` },
    side(a, [`faces ${faces("face_a")}`],
      write ? [actionButton(`Merge into ${b}`, `Merge ${a} into ${b}`, () => askMerge(where, a, b))] : []),
    el("div", { class: "versus" },
      el("p", { class: "score", text: `score ${fmt(pair.score)}` }),
      el("p", { class: "muted", text: typeof pair.false_alarm_probability === "number"
        ? `chance of a false alarm ${pair.false_alarm_probability.toPrecision(2)}` : "chance of a false alarm: unknown (no impostor tail)" }),
      el("ul", { class: "evidence" }, ...pair.evidence.map(evidence))),
    side(b, [`faces ${faces("face_b")}`],
      write ? [actionButton(`Merge into ${a}`, `Merge ${b} into ${a}`, () => askMerge(where, b, a))] : []));
}

// GET /outliers's answer, through a scan job: {"faces": [{"identity_id", "face_id", "own_score",
// "best_other": {"identity_id", "score", "face_id"} | null}], "threshold", "identities_checked", ...}
async function loadOutliers(announce = true) {
  const list = $("outliers-list");
  const waiting = "Looking for faces unlike their identity's others...";
  const { where, current } = scanTicket("outliers");
  if (announce) galleryStatus(waiting);
  try {
    const r = await scanJob("outliers", where, "outliers-min-score", waiting, announce);
    if (!r || !current()) return; // of a collection or a view left, or a newer scan was asked for
    const ticked = new Set(outlierBoxes().filter((box) => box.checked).map((box) => box.dataset.faceId));
    replaceRows(list, r.faces.map((face) => outlierItem(face, r.threshold, where)));
    list.dataset.collection = where; // Delete selected erases the faces ticked there
    for (const box of outlierBoxes()) box.checked = ticked.has(box.dataset.faceId); // a new scan keeps the ticks
    showOutlierSelection();
    if (announce || !r.faces.length) {
      galleryStatus(r.faces.length
        ? `${r.faces.length} face(s) below ${fmt(r.threshold)} against their own identity (${r.identities_checked} identities checked).`
        : `No face below ${fmt(r.threshold)} against its own identity (${r.identities_checked} identities checked).`);
    }
  } catch (err) {
    if (!current()) return;
    replaceRows(list, []);
    showOutlierSelection();
    galleryStatus(missingRoute(err, "an outlier search"), "error");
  }
}

// a face found in collection `where`: its buttons act there
function outlierItem(face, threshold, where) {
  const other = face.best_other;
  const write = canWrite();
  const buttons = write ? [
    ...(other ? [actionButton(`Move to ${other.identity_id}`, `Move face ${face.face_id} to ${other.identity_id}`,
      () => askMove(where, face.face_id, face.identity_id, other.identity_id))] : []),
    actionButton("Move to...", `Move face ${face.face_id} to another identity`, () => askMove(where, face.face_id, face.identity_id)),
    actionButton("Delete face", `Delete face ${face.face_id}`, () => askDeleteFace(where, face.face_id, face.identity_id), "danger small"),
  ] : [];
  const own = side(`face ${face.face_id} of ${face.identity_id}`,
    [`best score against its own identity's other faces ${fmt(face.own_score)} (threshold ${fmt(threshold)})`], buttons,
    cropThumb(face.face_id, face.identity_id, where));
  if (write) { // ticked, it is one of the faces "Delete selected" erases
    own.prepend(el("label", { class: "check" },
      el("input", { type: "checkbox", "data-face-id": String(face.face_id), "data-identity": face.identity_id }),
      "Select", el("span", { class: "sr-only", text: ` face ${face.face_id} of ${face.identity_id}` })));
  }
  return el("li", { class: "pair-card", "data-id": String(face.face_id) }, own,
    el("div", { class: "versus" }, el("p", { class: "score", text: other ? "looks more like" : "matches no other identity" })),
    other ? side(other.identity_id, [`face ${other.face_id}, score ${fmt(other.score)}`], [],
      other.face_id == null ? null : cropThumb(other.face_id, other.identity_id, where)) : el("div", { class: "side muted" }));
}

// --- several outliers at once: tick them, then one POST faces/delete ------------------------------
// The checkboxes are drawn for write keys only (outlierItem, as its buttons); the bar above the list
// shows with them. The faces erased (and those already gone) leave the list; the rest stay as scanned,
// ticks kept, with no new scan (minutes at a million faces).
const outlierBoxes = () => [...$("outliers-list").querySelectorAll("input[type=checkbox][data-face-id]")];
const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

function showOutlierSelection() {
  const boxes = outlierBoxes();
  const ticked = boxes.filter((box) => box.checked);
  for (const box of boxes) box.closest(".pair-card").classList.toggle("selected", box.checked);
  $("outliers-bulk").hidden = !boxes.length; // none drawn: a read key, or no outlier
  const all = $("outliers-select-all");
  all.checked = boxes.length > 0 && ticked.length === boxes.length;
  all.indeterminate = ticked.length > 0 && ticked.length < boxes.length;
  const button = $("outliers-delete-selected");
  button.textContent = `Delete selected (${ticked.length})`;
  button.disabled = !ticked.length || button.dataset.busy === "true";
  return ticked;
}

// POST faces/delete's answer in words: "Deleted 5 faces (2 identities deleted with their last face); 1 was already gone."
function bulkDeleteText(r) {
  const emptied = r.deleted.filter((d) => d.identity_deleted).length;
  const gone = r.not_found.length;
  return (r.deleted.length ? `Deleted ${plural(r.deleted.length, "face", "faces")}` : "No face deleted")
    + (emptied ? ` (${plural(emptied, "identity", "identities")} deleted with ${emptied === 1 ? "its" : "their"} last face)` : "")
    + (gone ? `; ${gone} ${gone === 1 ? "was" : "were"} already gone` : "") + ".";
}

async function askDeleteSelected() {
  const ticked = showOutlierSelection();
  if (!ticked.length) return;
  const where = $("outliers-list").dataset.collection; // the collection the list was scanned in
  const faceIds = ticked.map((box) => Number(box.dataset.faceId));
  const identities = [...new Set(ticked.map((box) => box.dataset.identity))];
  const named = [...identities.slice(0, 3).flatMap((id, i) => [...(i ? [", "] : []), ...iso`"${id}"`]),
    ...(identities.length > 3 ? [` and ${identities.length - 3} more`] : [])];
  const faces = plural(faceIds.length, "face", "faces");
  const ok = await confirmHygiene({ title: `Delete ${faces}?`, confirm: `Delete ${faces}`,
    text: [...iso`Delete the ${faceIds.length === 1 ? "selected face" : `${faceIds.length} selected faces`} (of ${named})? `,
      "They are erased and can never be matched again; an identity left with no face is deleted too. This cannot be undone."] });
  if (ok === null) return;
  const button = $("outliers-delete-selected");
  button.dataset.busy = "true";
  showOutlierSelection();
  try {
    const r = await api(inCollection(where, "faces/delete"), { method: "POST", json: { face_ids: faceIds },
      action: `delete faces in ${quoted(where)}` });
    const here = where === collection();
    for (const d of r.deleted) if (here && d.identity_deleted && hygiene.identity === d.identity_id) hygiene.identity = null;
    const erased = new Set([...r.deleted.map((d) => d.face_id), ...r.not_found].map(String));
    for (const item of [...$("outliers-list").children]) if (erased.has(item.dataset.id)) item.remove();
    sweepCrops(); // the removed rows' thumbnails
    galleryStatus(bulkDeleteText(r), "ok");
  } catch (err) {
    galleryStatus(["not_found", "method_not_allowed"].includes(err.code)
      ? "This service does not offer deleting several faces at once (an older version): delete them one by one."
      : err.readable, "error");
  } finally {
    delete button.dataset.busy;
    // the button just pressed is disabled or gone now: keyboard focus goes on from the bar, or the search
    (showOutlierSelection().length ? button : $("outliers-bulk").hidden ? $("outliers-show") : $("outliers-select-all")).focus();
  }
}

// --- Status ----------------------------------------------------------------------------------------
const READY_FIELDS = [
  ["status", "Status"], ["model_id", "Model"], ["providers", "Providers"], ["embedding_size", "Embedding size"],
  ["verify_threshold", "Verify threshold (1:1)"], ["identify_threshold", "Identify threshold (1:N)"],
  ["identify_threshold_source", "Identify threshold from"], ["identify_fpir", "Target FPIR (strangers named)"],
  ["inference_ms", "Inference just now (ms)"],
];

// the impostor tail behind the 1:N threshold, in one line a person can read
function tailText(tail) {
  if (!tail || typeof tail !== "object") return "none";
  const where = tail.source === "gallery" ? "calibrated on this gallery's data" : "the model's";
  const floor = typeof tail.far_min === "number" ? `, measured down to FAR ${tail.far_min.toExponential(1)}` : "";
  const beyond = tail.extrapolated ? " (threshold extrapolated beyond it)" : "";
  return `${where}${floor}${beyond}`;
}

// /readyz's quality object in two short lines: the score floor, and each part's limits
function qualityRows(q) {
  if (!q || typeof q !== "object") return [];
  const floor = q.fitted
    ? `score >= ${fmt(q.min_score, 3)} (photos), >= ${fmt(q.min_score_crop, 3)} (crops); ${q.source === "gallery" ? "refitted on this gallery" : "the model's fit"}`
    : "no fitted score: part limits only";
  const limits = Object.entries(q.limits || {}).map(([part, { min, max }]) => {
    const num = (x) => (Number.isInteger(x) ? String(x) : fmt(x, 2));
    if (min !== null && max !== null) return `${part} ${num(min)}..${num(max)}`;
    return min !== null ? `${part} >= ${num(min)}` : `${part} <= ${num(max)}`;
  });
  return [["Enroll quality", floor], ["Quality part limits", limits.join(", ")]];
}

function facts(node, rows) {
  node.replaceChildren(...rows.flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { text: value })]));
}

// any /readyz value as a person reads it: never JSON text (an object: "key: value, ...", one nested in
// parentheses; null: "none"; true/false: "yes"/"no")
function show(value, nested = false) {
  if (value === null || value === undefined) return "none";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : fmt(value);
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (Array.isArray(value)) {
    const text = value.map((item) => show(item, true)).join(", ");
    return nested && value.length > 1 ? `(${text})` : text || "none";
  }
  if (typeof value === "object") {
    const entries = Object.entries(value);
    if (!entries.length) return "none";
    const text = entries.map(([key, item]) => `${key}: ${show(item, true)}`).join(", ");
    return nested ? `(${text})` : text;
  }
  return String(value);
}

// /readyz's `models`: one row per served model, in the service's order, the default marked; where its
// impostor tail and quality come from in the words of the Model card
const TAIL_SOURCES = { gallery: "calibrated on this gallery's data", model: "the model's" };
const QUALITY_SOURCES = { gallery: "refitted on this gallery", model: "the model's" };
const MODEL_COLUMNS = [
  ["model_id", "Model", (v) => show(v)], ["dim", "Embedding size", (v) => show(v)],
  ["provider", "Provider", (v) => show(v)], ["ready", "Ready", (v) => (v ? "ready" : "not ready")],
  ["impostor_tail_source", "Impostor tail", (v) => TAIL_SOURCES[v] || show(v)],
  ["quality_source", "Quality", (v) => QUALITY_SOURCES[v] || show(v)],
];

function showModels(models, defaultName) {
  const card = $("status-models-card");
  const entries = models && typeof models === "object" && !Array.isArray(models) ? Object.entries(models) : [];
  card.hidden = !entries.length;
  $("status-model-title").textContent = entries.length > 1 ? "Default model" : "Model";
  if (!entries.length) return;
  const known = new Set(MODEL_COLUMNS.map(([key]) => key).concat(["default"]));
  // fields a newer service adds to each model get a column of their own, shown readably
  const extra = [...new Set(entries.flatMap(([, m]) => (m && typeof m === "object" ? Object.keys(m) : [])))]
    .filter((key) => !known.has(key));
  const columns = MODEL_COLUMNS.concat(extra.map((key) => [key, key, (v) => show(v)]));
  const table = $("status-models");
  table.tHead.replaceChildren(el("tr", {}, el("th", { scope: "col", text: "Name" }),
    ...columns.map(([, label]) => el("th", { scope: "col", text: label }))));
  table.tBodies[0].replaceChildren(...entries.map(([name, m]) => {
    const info = m && typeof m === "object" ? m : {};
    const isDefault = info.default === true || (info.default === undefined && name === defaultName);
    const head = el("th", { scope: "row", "data-label": "Name" }, el("span", { class: "mono", text: name }),
      isDefault ? el("span", { class: "tag", text: "default" }) : null);
    return el("tr", { "data-name": name, class: isDefault ? "default" : "" }, head,
      ...columns.map(([key, label, text]) => el("td", { "data-label": label, text: text(info[key]) })));
  }));
}

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const pair of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

function total(samples, name, where = () => true) {
  return samples.filter((s) => s.name === name && where(s.labels)).reduce((sum, s) => sum + s.value, 0);
}

function metricRows(samples) {
  const mean = (name, where) => {
    const count = total(samples, `${name}_count`, where);
    return count ? total(samples, `${name}_sum`, where) / count : null;
  };
  const rows = [
    ["Requests served", String(total(samples, "face_http_requests_total"))],
    ["Error responses", String(total(samples, "face_http_requests_total", (l) => Number(l.status) >= 400))],
    ["Embeddings computed", String(total(samples, "face_embeddings_computed_total"))],
    ["Faces detected", String(total(samples, "face_faces_detected_total"))],
  ];
  const batch = mean("face_inference_batch_size");
  if (batch !== null) rows.push(["Mean batch size", fmt(batch, 2)]);
  const inference = mean("face_inference_seconds");
  if (inference !== null) rows.push(["Mean inference (ms)", fmt(inference * 1000, 1)]);
  const identify = mean("face_http_request_duration_seconds", (l) => l.route === "/identify");
  if (identify !== null) rows.push(["Mean /identify latency (ms)", fmt(identify * 1000, 1)]);
  const errors = samples.filter((s) => s.name === "face_errors_total" && s.value > 0).sort((a, b) => b.value - a.value);
  if (errors.length) rows.push(["Errors by code", errors.slice(0, 5).map((s) => `${s.labels.code} ${s.value}`).join(", ")]);
  return rows;
}

// the chosen collection: its counts and its own open-set threshold (GET /collections/{name}); a key
// that may not read it (embed) sees what /readyz says of the default one
async function collectionRows(ready) {
  const name = collection();
  const rows = [["Collection", name]];
  let info = null;
  try {
    info = await api(`collections/${encodeURIComponent(name)}`, { action: `see ${quoted(name)}` });
  } catch (err) {
    if (err.code !== "forbidden") rows.push(["Unavailable", err.readable]); // an embed key may not read it
  }
  if (info) {
    rows.push(["Identities", show(info.identities)], ["Faces", show(info.faces)]);
    if (info.identify_threshold !== undefined) rows.push(["Identify threshold (1:N)", show(info.identify_threshold)]);
    if (info.created_at) rows.push(["Created", when(info.created_at)]);
    for (const [key, , label] of COLLECTION_SETTINGS) rows.push([label, settingText(key, info[key])]);
    if (typeof info.keep_crops === "boolean") { // fixed when the collection was made (keep_crops)
      rows.push(["Face crops", info.keep_crops ? "kept, encrypted (keep_crops)" : "not kept: embeddings only"]);
    }
  } else if (name === DEFAULT_COLLECTION && ready.gallery && typeof ready.gallery === "object") {
    if (ready.gallery.identities !== undefined) rows.push(["Identities", show(ready.gallery.identities)]);
    if (ready.gallery.faces !== undefined) rows.push(["Faces", show(ready.gallery.faces)]);
  }
  return rows;
}

async function refreshStatus() {
  const message = $("status-message");
  try {
    let ready;
    try {
      ready = await api("readyz");
    } catch (err) {
      if (err.status !== 503) throw err;
      ready = { status: err.details.status || "not ready", detail: err.readable };
    }
    const known = new Set(READY_FIELDS.map(([key]) => key).concat(["gallery", "model_path", "impostor_tail", "collections",
      "quality", "default_model", "models"]));
    // a rate is shown as it is (0.0001 would round to "0.000")
    const rows = READY_FIELDS.filter(([key]) => ready[key] !== undefined)
      .map(([key, label]) => [label, key === "identify_fpir" && ready[key] !== null ? String(ready[key]) : show(ready[key])]);
    if (ready.impostor_tail !== undefined) rows.push(["Impostor tail", tailText(ready.impostor_tail)]);
    rows.push(...qualityRows(ready.quality));
    if (ready.gallery && typeof ready.gallery === "object") {
      if (ready.gallery.identities !== undefined) rows.push(["Gallery identities", show(ready.gallery.identities)]);
      if (ready.gallery.faces !== undefined) rows.push(["Gallery faces", show(ready.gallery.faces)]);
    }
    const listed = ready.models && typeof ready.models === "object" && Object.keys(ready.models).length;
    if (!listed && typeof ready.default_model === "string") rows.push(["Default model", ready.default_model]);
    // fields this console does not know yet (newer services) are still shown, readably
    for (const [key, value] of Object.entries(ready)) if (!known.has(key)) rows.push([key, show(value)]);
    facts($("status-model"), rows);
    showModels(ready.models, ready.default_model);
    facts($("status-collection"), await collectionRows(ready));
    try {
      facts($("status-metrics"), metricRows(parseMetrics(await api("metrics", { text: true, action: "read the metrics" }))));
    } catch (err) {
      if (err.code !== "forbidden") throw err;
      facts($("status-metrics"), [["Not shown", err.readable]]); // /metrics is for admins
    }
    say(message, `Updated ${new Date().toLocaleTimeString()}.`);
  } catch (err) {
    say(message, err.readable, "error");
  }
}

// --- Keys (admins) -----------------------------------------------------------------------------------
const when = (t) => (typeof t === "number" ? new Date(t * 1000).toLocaleString() : "");
let newSecret = null; // the secret just created: in this variable only, never in any storage

async function loadKeys() {
  const status = $("keys-status");
  try {
    const r = await api("keys", { action: "manage keys" });
    $("keys-table").tBodies[0].replaceChildren(...r.items.map(keyRow));
    const live = r.items.filter((k) => !k.revoked_at).length;
    say(status, `${r.items.length} key(s), ${live} not revoked.`);
  } catch (err) {
    say(status, err.readable, "error");
  }
}

function keyRow(key) {
  const cells = [
    el("th", { scope: "row", class: "mono", text: key.key_id }),
    el("td", { text: key.role }),
    el("td", { class: "wrap", text: key.collections ? key.collections.join(", ") : "all" }),
    el("td", { class: "wrap", text: key.note || "" }),
    el("td", { text: when(key.created_at) }),
    el("td", { text: key.expires_at ? when(key.expires_at) : "never" }),
    el("td", { text: key.last_used_at ? when(key.last_used_at) : "never" }),
    el("td", { text: key.revoked_at ? when(key.revoked_at) : "" }),
  ];
  const actions = el("td");
  if (!key.revoked_at) {
    const revoke = el("button", { type: "button", class: "danger small", text: "Revoke", "aria-label": `Revoke ${key.key_id}` });
    revoke.addEventListener("click", () => confirmRevoke(key));
    actions.append(revoke);
  }
  return el("tr", { "data-id": key.key_id, class: key.revoked_at ? "revoked" : "" }, ...cells, actions);
}

// A number field's value as JSON reads it: a number, or the text as typed when it is none (the server
// refuses it with a message; Number("abc") is NaN, which JSON sends as null: "no limit")
function numberOrText(text) {
  const n = Number(text);
  return Number.isFinite(n) ? n : text;
}

function optionalNumber(input) {
  const text = input.value.trim();
  return text === "" ? null : numberOrText(text);
}

async function createKey(event) {
  event.preventDefault();
  const status = $("keys-status");
  const all = $("keys-all").checked;
  const chosen = [...$("keys-collections").selectedOptions].map((o) => o.value);
  if (!all && !chosen.length) return say(status, "Pick at least one collection, or \"All collections\".", "error");
  const days = optionalNumber($("keys-expires"));
  const body = {
    role: $("keys-role").value,
    collections: all ? null : chosen,
    note: $("keys-note").value.trim() || null,
    expires_at: typeof days === "number" && days ? Math.round(Date.now() / 1000 + days * 86400) : days || null,
    rate_limit_rps: optionalNumber($("keys-rps")),
    rate_limit_faces_per_s: optionalNumber($("keys-fps")),
  };
  say(status, "Creating...");
  $("keys-create").disabled = true;
  try {
    const made = await api("keys", { method: "POST", json: body, action: "create keys" });
    $("keys-form").reset();
    $("keys-collections").disabled = true;
    showSecret(made);
    say(status, `Key ${made.key_id} created (${made.role}, ${made.collections ? made.collections.join(", ") : "all collections"}).`, "ok");
    await loadKeys();
    say(status, `Key ${made.key_id} created (${made.role}, ${made.collections ? made.collections.join(", ") : "all collections"}).`, "ok");
  } catch (err) {
    say(status, err.readable, "error");
  } finally {
    $("keys-create").disabled = false;
  }
}

function showSecret(made) {
  newSecret = made.secret;
  $("keys-secret-id").textContent = made.key_id;
  $("keys-secret-value").value = made.secret;
  $("keys-secret").hidden = false;
  $("keys-secret-value").focus();
  $("keys-secret-value").select();
}

function hideSecret() {
  newSecret = null;
  $("keys-secret-value").value = "";
  $("keys-secret-id").textContent = "";
  $("keys-secret").hidden = true;
}

async function copySecret() {
  const field = $("keys-secret-value");
  try {
    await navigator.clipboard.writeText(field.value);
  } catch (_) { // no clipboard permission: the selection and the old command still work
    field.focus();
    field.select();
    document.execCommand("copy");
  }
  say($("keys-status"), "Secret copied to the clipboard.", "ok");
}

async function useNewKey() {
  if (!newSecret) return;
  sessionStorage.setItem(KEY_STORE, newSecret); // the admin's choice: this tab now works as that key
  hideSecret();
  const from = window.location.hash; // the Keys page, where the button is
  await refreshSession();
  say($("collection-status"), `Now using this tab with the new ${session.role || ""} key; "API key" switches back.`, "ok");
  // from Keys (an admin page: the new key may not be one) to Try; but a page chosen during the switch
  // stays chosen, drawn now that the key's role and collections are known
  if (window.location.hash === from && from !== "#try") window.location.hash = "try";
  else route();
}

function confirmRevoke(key) {
  const dialog = $("revoke-dialog");
  setText($("revoke-text"), iso`Revoke key ${key.key_id} (${key.role}${key.note ? iso`, "${key.note}"` : ""})? Every request made with it is refused from now on. This cannot be undone.`);
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "revoke") return;
    try {
      const r = await api(`keys/${encodeURIComponent(key.key_id)}`, { method: "DELETE", action: "revoke keys" });
      await loadKeys();
      say($("keys-status"), `Revoked ${r.key_id}.`, "ok");
    } catch (err) {
      say($("keys-status"), err.readable, "error");
    }
  };
  dialog.showModal();
}

// --- Audit (admins) ----------------------------------------------------------------------------------
const audit = { next: null, limit: 25, filters: "" }; // filters: those of the first page, kept for More

// a day picked in the browser, as the service's unix seconds: the local midnight that starts it
function dayStart(value, plusDays = 0) {
  const [y, m, d] = value.split("-").map(Number);
  return new Date(y, m - 1, d + plusDays).getTime() / 1000;
}

function auditFilters() {
  const params = new URLSearchParams({ limit: String(audit.limit) });
  const put = (name, value) => value && params.set(name, value);
  put("collection", $("audit-collection").value);
  put("identity_id", $("audit-identity").value.trim());
  put("key_id", $("audit-key").value.trim());
  if ($("audit-since").value) params.set("since", String(dayStart($("audit-since").value)));
  if ($("audit-until").value) params.set("until", String(dayStart($("audit-until").value, 1)));
  return params.toString();
}

// an entry's details, compact: one element per field, name=value, each string JSON-quoted and isolated,
// so that no string (a metadata key, an identity id: either may hold ", name=value" or U+202E) reads as
// another field or reorders the fields after it
function detailFields(details) {
  if (!details || typeof details !== "object") return [];
  return Object.entries(details).flatMap(([name, value], i) => {
    let text;
    if (value === null) text = [name === "collections" ? "all" : "none"]; // a key's scope: null is every collection
    else if (typeof value === "number" && name.endsWith("_at")) text = [when(value)];
    else text = jsonParts(value);
    return [...(i ? [", "] : []), el("span", { class: "field", "data-name": name }, bdi(name), "=", ...text)];
  });
}

function auditRow(entry) {
  return el("tr", { "data-id": entry.entry_id, "data-action": entry.action },
    el("td", { text: when(entry.at) }),
    el("th", { scope: "row", text: entry.action }),
    el("td", { class: "wrap", text: entry.collection || "" }),
    el("td", { class: "wrap", text: entry.identity_id || "" }),
    el("td", { class: "mono", text: entry.key_id || "" }),
    el("td", { class: "wrap", text: entry.client || "" }),
    el("td", { class: "meta" }, ...detailFields(entry.details)));
}

async function loadAudit(more = false) {
  const status = $("audit-status");
  const body = $("audit-table").tBodies[0];
  if (!more) Object.assign(audit, { next: null, filters: auditFilters() });
  say(status, "Loading...");
  $("audit-more").disabled = true;
  try {
    const cursor = more && audit.next ? `&cursor=${encodeURIComponent(audit.next)}` : "";
    const r = await api(`audit?${audit.filters}${cursor}`, { action: "read the audit trail" });
    if (more) body.append(...r.items.map(auditRow));
    else body.replaceChildren(...r.items.map(auditRow));
    audit.next = r.next_cursor;
    $("audit-more").disabled = !audit.next;
    const shown = body.rows.length;
    say(status, shown ? `${shown} change(s) shown, newest first${audit.next ? "; More shows older ones" : ""}.` : "No recorded changes match.");
  } catch (err) {
    say(status, err.readable, "error");
  }
}

// --- start -------------------------------------------------------------------------------------------
// --- Group: POST /cluster, each cluster a row of face thumbnails cut from the photos here -------
const THUMB = 96;

function faceThumb(img, face, title) {
  // the face's box widened by a quarter each side, square, from the photo already in the page
  // (an aligned crop or an embedding has no box: the whole image is shown)
  const canvas = el("canvas", { width: THUMB, height: THUMB, class: "face-thumb", title });
  const ctx = canvas.getContext("2d");
  let [x, y, w, h] = face ? face.box : [0, 0, img.naturalWidth, img.naturalHeight];
  const side = Math.max(w, h) * (face ? 1.5 : 1);
  x += w / 2 - side / 2;
  y += h / 2 - side / 2;
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, THUMB, THUMB);
  ctx.drawImage(img, x, y, side, side, 0, 0, THUMB, THUMB);
  return canvas;
}

async function groupPhotos(event) {
  event.preventDefault();
  const files = [...$("group-files").files];
  const status = $("group-status");
  const box = $("group-clusters");
  if (!files.length) return say(status, "Pick photos first.", "error");
  const fields = { image_type: "auto" };
  const threshold = $("group-threshold").value.trim();
  if (threshold !== "") fields.threshold = Number(threshold);
  say(status, `Finding and grouping the faces of ${files.length} photo(s)...`);
  box.replaceChildren();
  $("group-submit").disabled = true;
  try {
    const [r, images] = await Promise.all([
      api("cluster", { method: "POST", form: photoForm(fields, files.map((f) => ["images", f])), action: "group faces" }),
      Promise.all(files.map((f) => loadImage(f).catch(() => null))),
    ]);
    const rows = [];
    const alone = [];
    for (const cluster of r.clusters) {
      const thumbs = cluster.faces.map((face) => {
        const img = images[face.image_index];
        const name = files[face.image_index].name;
        const node = img ? faceThumb(img, face.face, name) : el("div", { class: "face-thumb", text: name });
        node.setAttribute("data-image-index", String(face.image_index));
        node.setAttribute("data-face-index", String(face.face_index));
        node.setAttribute("data-cluster-id", String(cluster.cluster_id));
        return node;
      });
      if (cluster.size > 1) {
        rows.push(el("section", { class: "cluster-row", "data-cluster-id": String(cluster.cluster_id) },
          el("h3", { text: `Person ${rows.length + 1}: ${cluster.size} faces` }),
          el("div", { class: "cluster-faces" }, ...thumbs)));
      } else alone.push(...thumbs);
    }
    if (alone.length) {
      rows.push(el("section", { class: "cluster-row alone", "data-cluster-id": "alone" },
        el("h3", { text: `Seen once: ${alone.length} face(s)` }), el("div", { class: "cluster-faces" }, ...alone)));
    }
    box.replaceChildren(...rows);
    const people = r.clusters.filter((c) => c.size > 1).length;
    say(status, `${r.faces} face(s): ${people} group(s) of the same person, ${alone.length} seen once ` +
      `(threshold ${fmt(r.threshold)}, ${r.method}).`, "ok");
  } catch (err) {
    say(status, err.readable || String(err), "error");
  } finally {
    $("group-submit").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => $("group-form").addEventListener("submit", groupPhotos));

async function start() {
  try {
    Object.assign(config, await api("console/config.json"));
  } catch (_) { /* an older service: the defaults apply */ }
  $("key-form").addEventListener("submit", submitKey);
  $("key-cancel").addEventListener("click", () => $("key-dialog").close());
  $("key-button").addEventListener("click", () => askForKey());
  setupDrop($("try-drop"), $("try-file"), tryPhoto);
  $("try-among-form").addEventListener("submit", tryAgain);
  preview($("compare-a"), $("compare-a-preview"));
  preview($("compare-b"), $("compare-b-preview"));
  $("compare-form").addEventListener("submit", compare);
  $("enroll-files").addEventListener("change", previewCrops);
  $("enroll-form").addEventListener("submit", enroll);
  $("gallery-search").addEventListener("submit", (event) => {
    event.preventDefault();
    Object.assign(gallery, { query: $("gallery-query").value.trim(), page: 0, cursors: [null] });
    loadGallery();
  });
  $("gallery-all").addEventListener("click", () => {
    $("gallery-query").value = "";
    Object.assign(gallery, { query: "", page: 0, cursors: [null] });
    loadGallery();
  });
  $("gallery-prev").addEventListener("click", () => {
    gallery.page = Math.max(0, gallery.page - 1);
    loadGallery();
  });
  $("gallery-next").addEventListener("click", () => {
    if (!gallery.next) return;
    gallery.cursors[gallery.page + 1] = gallery.next;
    gallery.page += 1;
    loadGallery();
  });
  setupHygiene();
  $("collection-select").addEventListener("change", (event) => chooseCollection(event.target.value));
  $("collection-new").addEventListener("click", openNewCollection);
  $("collection-form").addEventListener("submit", createCollection);
  $("collection-cancel").addEventListener("click", () => $("collection-dialog").close());
  $("collection-delete").addEventListener("click", confirmDeleteCollection);
  $("collection-settings").addEventListener("click", openSettings);
  $("settings-form").addEventListener("submit", saveSettings);
  $("settings-cancel").addEventListener("click", () => $("settings-dialog").close());
  $("settings-dialog").addEventListener("close", () => $("collection-settings").focus()); // back to the opener
  $("keys-form").addEventListener("submit", createKey);
  $("keys-all").addEventListener("change", () => { $("keys-collections").disabled = $("keys-all").checked; });
  $("keys-secret-copy").addEventListener("click", copySecret);
  $("keys-secret-use").addEventListener("click", useNewKey);
  $("keys-secret-done").addEventListener("click", () => {
    hideSecret();
    say($("keys-status"), "The secret is hidden; it cannot be shown again.");
  });
  $("audit-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    loadAudit();
  });
  $("audit-clear").addEventListener("click", () => {
    $("audit-filters").reset();
    loadAudit();
  });
  $("audit-more").addEventListener("click", () => loadAudit(true));
  window.addEventListener("hashchange", route);
  // shown once: leaving the console forgets it too (a page kept in the back/forward cache comes back on
  // Back just as it was left, the secret with it, unless it is hidden before the page is put away)
  window.addEventListener("pagehide", () => {
    if (!newSecret) return;
    hideSecret();
    say($("keys-status"), "The secret was hidden when you left the page; it cannot be shown again.");
  });
  if (config.api_key_required && !sessionStorage.getItem(KEY_STORE)) {
    document.body.dataset.ready = "true";
    askForKey();
    return;
  }
  await refreshSession();
  document.body.dataset.ready = "true";
  route();
}

document.addEventListener("DOMContentLoaded", start);
