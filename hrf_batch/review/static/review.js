// The B-scan review page: draws one B-scan with its overlays and sends the grader's verdicts.
// Every change goes to the server, and the page redraws from the state the server sends back,
// so what the grader sees is what was stored.
"use strict";

(function () {
  const cfg = JSON.parse(document.getElementById("review-config").textContent);
  const token = document.querySelector('meta[name="review-token"]').content;
  const tokenHeader = document.querySelector('meta[name="review-token-header"]').content;
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const [height, width] = cfg.shape;

  const state = {
    index: Math.min(Math.max(cfg.start || 0, 0), cfg.nBscans - 1),
    view: null,
    selected: null, // {kind: "lesion" | "added", key: lesion index or added id}
    zoom: 1,
    missedMode: false,
    busy: false,
  };

  // ---- talking to the server --------------------------------------------------------------

  async function call(method, path, body) {
    const options = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
    if (method !== "GET") {
      options.headers[tokenHeader] = token;
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body || {});
    }
    const response = await fetch(path, options);
    let answer = null;
    try {
      answer = await response.json();
    } catch (err) {
      answer = { error: `the server answered ${response.status} ${response.statusText}` };
    }
    if (!response.ok) {
      const problem = new Error(answer.error || `request failed (${response.status})`);
      problem.hint = answer.hint || "";
      throw problem;
    }
    return answer;
  }

  function bscanPath(index) {
    return `/api/run/${cfg.runId}/bscan/${index}`;
  }

  async function load(index, keepSelection) {
    say("");
    try {
      const view = await call("GET", bscanPath(index));
      const changed = !state.view || state.view.index !== view.index;
      state.index = view.index;
      state.view = view;
      if (changed) {
        $("bscan").src = `/img/run/${cfg.runId}/bscan/${index}.png`;
        history.replaceState(null, "", `?b=${index}`);
      }
      if (!keepSelection || changed) selectFirstUndecided();
      render();
    } catch (err) {
      say(err.message, err.hint, true);
    }
  }

  async function write(method, suffix, body, message) {
    if (cfg.readOnly) {
      say("This page is read-only", "start hrf-batch review with --grader NAME to record verdicts", true);
      return null;
    }
    if (state.busy) return null;
    state.busy = true;
    document.body.classList.add("busy");
    try {
      const view = await call(method, bscanPath(state.index) + suffix, body);
      state.view = view;
      render();
      if (message) say(message);
      return view;
    } catch (err) {
      say(err.message, err.hint, true);
      return null;
    } finally {
      state.busy = false;
      document.body.classList.remove("busy");
    }
  }

  // ---- actions ----------------------------------------------------------------------------

  function go(index) {
    if (index < 0 || index >= cfg.nBscans) return;
    load(index, false);
  }

  function nextOpen() {
    const status = state.view ? state.view.status : [];
    for (let step = 1; step <= cfg.nBscans; step++) {
      const i = (state.index + step) % cfg.nBscans;
      if (status[i] !== "done") return go(i);
    }
    say("Every B-scan of this volume is reviewed.");
  }

  function selectedLesion() {
    if (!state.selected || state.selected.kind !== "lesion" || !state.view) return null;
    return state.view.lesions.find((l) => l.index === state.selected.key) || null;
  }

  async function judge(verdict) {
    const lesion = selectedLesion();
    if (!lesion) {
      say("Select a lesion first (click it, or press Tab).", "", true);
      return;
    }
    const view = await write("POST", `/lesion/${lesion.index}`, { verdict },
      verdict ? `Lesion ${lesion.index + 1} ${verdict}ed.` : `Verdict on lesion ${lesion.index + 1} withdrawn.`);
    if (view && verdict) selectNextUndecided(lesion.index);
    render();
  }

  async function clearSelected() {
    if (!state.selected) return;
    if (state.selected.kind === "added") {
      const id = state.selected.key;
      const view = await write("DELETE", `/added/${id}`, {}, "Added lesion removed.");
      if (view) state.selected = null;
      render();
    } else {
      judge(null);
    }
  }

  function hasHrf(value) {
    write("POST", "/hrf", { has_hrf: value }, value ? "Marked: this B-scan has HRF." : "Marked: no HRF in this B-scan.");
  }

  async function addMissed(row, col) {
    const view = await write("POST", "/added", { row, col }, `Missed HRF added at row ${row}, column ${col}.`);
    if (view && view.added_id !== undefined) state.selected = { kind: "added", key: view.added_id };
    setMissedMode(false);
    render();
  }

  function cycle(step) {
    const lesions = state.view ? state.view.lesions : [];
    if (!lesions.length) return;
    const current = selectedLesion();
    let at = current ? lesions.indexOf(current) : step > 0 ? -1 : 0;
    at = (at + step + lesions.length) % lesions.length;
    state.selected = { kind: "lesion", key: lesions[at].index };
    render();
  }

  function selectFirstUndecided() {
    const lesions = state.view.lesions;
    const open = lesions.find((l) => !l.verdict) || lesions[0];
    state.selected = open ? { kind: "lesion", key: open.index } : null;
  }

  function selectNextUndecided(after) {
    const lesions = state.view.lesions;
    const later = lesions.filter((l) => l.index > after).concat(lesions.filter((l) => l.index <= after));
    const open = later.find((l) => !l.verdict);
    if (open) state.selected = { kind: "lesion", key: open.index };
  }

  function setMissedMode(on) {
    state.missedMode = on && !cfg.readOnly;
    $("missed-mode").classList.toggle("active", state.missedMode);
    $("stage").classList.toggle("missed", state.missedMode);
    if (state.missedMode) say("Click on the HRF the model missed (Esc cancels).");
  }

  // ---- drawing ----------------------------------------------------------------------------

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    if (parent) parent.appendChild(node);
    return node;
  }

  function isSelected(kind, key) {
    return state.selected && state.selected.kind === kind && state.selected.key === key;
  }

  function label(parent, bbox, pad, text) { // beside the box; on its left near the right edge
    const [r0, c0, , c1] = bbox;
    const right = c1 + pad + 1 + 14 / state.zoom < width;
    el("text", { x: right ? c1 + pad + 1 : c0 - pad - 1, y: r0, class: "label", "text-anchor": right ? "start" : "end" },
      parent).textContent = text;
  }

  function drawOverlay() {
    const svg = $("overlay");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.replaceChildren();
    const view = state.view;
    if ($("show-layers").checked) {
      const layers = el("g", { class: "layers" }, svg);
      for (const line of view.layers) {
        el("polyline", { points: line.points, class: `layer layer-${line.name}` }, layers).appendChild(
          Object.assign(document.createElementNS(SVG, "title"), { textContent: line.name }));
      }
    }
    if (!$("show-outlines").checked) return;
    const pad = 3; // px around a lesion's box that still selects it
    for (const lesion of view.lesions) {
      const [r0, c0, r1, c1] = lesion.bbox;
      const g = el("g", { class: `lesion ${lesion.verdict || "undecided"}`, "data-lesion": lesion.index }, svg);
      if (isSelected("lesion", lesion.index)) {
        g.classList.add("selected");
        el("rect", { x: c0 - pad, y: r0 - pad, width: c1 - c0 + 2 * pad, height: r1 - r0 + 2 * pad, class: "box" }, g);
      }
      el("path", { d: lesion.outline, class: "outline" }, g);
      el("rect", { x: c0 - pad, y: r0 - pad, width: c1 - c0 + 2 * pad, height: r1 - r0 + 2 * pad, class: "hit" }, g);
      label(g, lesion.bbox, pad, String(lesion.index + 1));
    }
    for (const added of view.added) {
      const [r0, c0, r1, c1] = added.bbox;
      const g = el("g", { class: `added ${added.mine ? "mine" : "other"}`, "data-added": added.id }, svg);
      if (isSelected("added", added.id)) {
        g.classList.add("selected");
        el("rect", { x: c0 - pad, y: r0 - pad, width: c1 - c0 + 2 * pad, height: r1 - r0 + 2 * pad, class: "box" }, g);
      }
      el("path", { d: added.outline, class: "outline" }, g);
      el("rect", { x: c0 - pad, y: r0 - pad, width: c1 - c0 + 2 * pad, height: r1 - r0 + 2 * pad, class: "hit" }, g);
      label(g, added.bbox, pad, "+");
    }
  }

  function item(text, classes, onClick) {
    const li = document.createElement("li");
    li.className = classes;
    li.textContent = text;
    li.addEventListener("click", onClick);
    return li;
  }

  function drawPanel() {
    const view = state.view;
    $("bscan-index").textContent = String(view.index + 1);
    const strip = $("strip");
    strip.replaceChildren();
    view.status.forEach((status, i) => {
      const cell = document.createElement("button");
      cell.className = `cell ${status}` + (i === view.index ? " current" : "");
      cell.title = `B-scan ${i + 1}: ${status}`;
      cell.addEventListener("click", () => go(i));
      strip.appendChild(cell);
    });
    const score = view.score === null ? "not scored" : `score ${view.score.toFixed(2)}`;
    $("facts").textContent = `${view.hrf_count} HRF found · ${score} · ${view.relevance ? "relevance map stored" : "no relevance map (below the threshold)"}`;
    const note = $("image-note");
    note.hidden = view.image.available;
    note.textContent = view.image.available ? "" : `${view.image.note}. Outlines are shown on a grey canvas.`;

    $("hrf-yes").classList.toggle("chosen", view.has_hrf === true);
    $("hrf-no").classList.toggle("chosen", view.has_hrf === false);
    const others = Object.entries(view.others_has_hrf).map(([g, v]) => `${g}: ${v ? "yes" : "no"}`);
    $("hrf-others").textContent = others.length ? `(${others.join(", ")})` : "";

    $("lesion-count").textContent = `(${view.lesions.length})`;
    $("lesions").replaceChildren(...view.lesions.map((l) => {
      const verdict = l.verdict ? l.verdict + "ed" : "undecided";
      const others = Object.entries(l.others).map(([g, v]) => `${g} ${v}`).join(", ");
      const place = [l.zone, l.subfield].filter((p) => p && p !== "unknown").join(", ");
      const text = `#${l.index + 1} · ${l.area_px} px` + (place ? ` · ${place}` : "") + ` · ${verdict}` +
        (others ? ` (${others})` : "");
      const li = item(text, `${l.verdict || "undecided"}` + (isSelected("lesion", l.index) ? " selected" : ""),
        () => { state.selected = { kind: "lesion", key: l.index }; render(); });
      li.dataset.lesion = l.index;
      return li;
    }));
    $("added-count").textContent = `(${view.added.length})`;
    $("added").replaceChildren(...view.added.map((a) => {
      const li = item(`+ ${a.area_px} px at row ${a.click[0]}, col ${a.click[1]} · by ${a.grader}`,
        `added ${a.mine ? "mine" : "other"}` + (isSelected("added", a.id) ? " selected" : ""),
        () => { state.selected = { kind: "added", key: a.id }; render(); });
      li.dataset.added = a.id;
      return li;
    }));
    const lesion = selectedLesion();
    $("accept").disabled = cfg.readOnly || !lesion;
    $("reject").disabled = cfg.readOnly || !lesion;
    $("clear").disabled = cfg.readOnly || !state.selected;
    for (const id of ["hrf-yes", "hrf-no", "missed-mode"]) $(id).disabled = cfg.readOnly;
    $("prev").disabled = view.index === 0;
    $("next").disabled = view.index === cfg.nBscans - 1;

    const p = view.progress;
    const who = view.grader ? `${view.grader}'s` : "any grader's";
    $("progress").textContent = `Volume, ${who} review: ${p.lesions_decided} of ${p.n_lesions} lesions decided ` +
      `(${p.lesions_accepted} accepted, ${p.lesions_rejected} rejected), ${p.lesions_added} added, ` +
      `${p.bscans_decided} of ${p.n_bscans} B-scans answered.`;
  }

  function drawRelevance() {
    const img = $("relevance");
    const show = $("show-relevance").checked && state.view.relevance;
    img.hidden = !show;
    if (show) {
      const src = `/img/run/${cfg.runId}/bscan/${state.view.index}/relevance.png`;
      if (img.getAttribute("src") !== src) img.src = src;
    }
    if ($("show-relevance").checked && !state.view.relevance) {
      say("No relevance map for this B-scan: its score was below the decision threshold, so it was not explained.");
    }
  }

  function render() {
    if (!state.view) return;
    drawOverlay();
    drawPanel();
    drawRelevance();
  }

  // ---- zoom -------------------------------------------------------------------------------

  function setZoom(zoom, anchor) {
    const wrap = $("stage-wrap");
    const old = state.zoom;
    state.zoom = Math.min(Math.max(zoom, 0.1), 16);
    const stage = $("stage");
    stage.style.width = `${width * state.zoom}px`;
    stage.style.height = `${height * state.zoom}px`;
    stage.classList.toggle("pixelated", state.zoom >= 2);
    $("zoom-level").textContent = `${Math.round(state.zoom * 100)} %`;
    $("overlay").style.setProperty("--zoom", String(state.zoom)); // labels keep their size on screen
    if (anchor) { // keep the point under the cursor in place
      const ratio = state.zoom / old;
      wrap.scrollLeft = (wrap.scrollLeft + anchor.x) * ratio - anchor.x;
      wrap.scrollTop = (wrap.scrollTop + anchor.y) * ratio - anchor.y;
    }
  }

  function zoomBy(factor) { // keep the middle of the viewer in place
    const wrap = $("stage-wrap");
    setZoom(state.zoom * factor, { x: wrap.clientWidth / 2, y: wrap.clientHeight / 2 });
  }

  function fit() { // the whole B-scan in the viewer, as large as it goes
    const wrap = $("stage-wrap");
    setZoom(Math.min((wrap.clientWidth - 16) / width, (wrap.clientHeight - 16) / height));
  }

  // ---- events -----------------------------------------------------------------------------

  function pixelAt(event) {
    const box = $("bscan").getBoundingClientRect();
    const col = Math.floor(((event.clientX - box.left) / box.width) * width);
    const row = Math.floor(((event.clientY - box.top) / box.height) * height);
    return [Math.min(Math.max(row, 0), height - 1), Math.min(Math.max(col, 0), width - 1)];
  }

  $("stage").addEventListener("click", (event) => {
    const target = event.target.closest("[data-lesion], [data-added]");
    if (event.shiftKey || state.missedMode) {
      const [row, col] = pixelAt(event);
      addMissed(row, col);
      return;
    }
    if (target && target.dataset.lesion !== undefined) {
      state.selected = { kind: "lesion", key: Number(target.dataset.lesion) };
    } else if (target && target.dataset.added !== undefined) {
      state.selected = { kind: "added", key: Number(target.dataset.added) };
    }
    render();
  });

  $("stage-wrap").addEventListener("wheel", (event) => {
    event.preventDefault();
    const box = $("stage-wrap").getBoundingClientRect();
    setZoom(state.zoom * (event.deltaY < 0 ? 1.15 : 1 / 1.15),
      { x: event.clientX - box.left, y: event.clientY - box.top });
  }, { passive: false });

  const buttons = {
    prev: () => go(state.index - 1), next: () => go(state.index + 1), "next-open": nextOpen,
    accept: () => judge("accept"), reject: () => judge("reject"), clear: clearSelected,
    "hrf-yes": () => hasHrf(true), "hrf-no": () => hasHrf(false), "missed-mode": () => setMissedMode(!state.missedMode),
    "zoom-in": () => zoomBy(1.25), "zoom-out": () => zoomBy(1 / 1.25),
    "zoom-fit": fit, "zoom-one": () => setZoom(1),
    "help-open": () => { $("help").hidden = false; }, "help-close": () => { $("help").hidden = true; },
  };
  for (const [id, action] of Object.entries(buttons)) $(id).addEventListener("click", action);
  for (const id of ["show-outlines", "show-relevance", "show-layers"]) $(id).addEventListener("change", render);

  function toggle(id) {
    $(id).checked = !$(id).checked;
    render();
  }

  const keys = {
    n: () => go(state.index + 1), ArrowRight: () => go(state.index + 1),
    p: () => go(state.index - 1), ArrowLeft: () => go(state.index - 1),
    u: nextOpen, a: () => judge("accept"), r: () => judge("reject"), c: clearSelected,
    Delete: clearSelected, Backspace: clearSelected,
    y: () => hasHrf(true), x: () => hasHrf(false), m: () => setMissedMode(!state.missedMode),
    o: () => toggle("show-outlines"), h: () => toggle("show-relevance"), l: () => toggle("show-layers"),
    "+": () => zoomBy(1.25), "=": () => zoomBy(1.25), "-": () => zoomBy(1 / 1.25),
    f: fit, 0: () => setZoom(1),
    "?": () => { $("help").hidden = !$("help").hidden; },
    Escape: () => { $("help").hidden = true; setMissedMode(false); },
  };

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.closest("input, textarea, select")) return;
    if (event.key === "Tab") {
      event.preventDefault();
      cycle(event.shiftKey ? -1 : 1);
      return;
    }
    const action = keys[event.key];
    if (action) {
      event.preventDefault();
      action();
    }
  });

  function say(text, hint, isError) {
    const box = $("message");
    box.textContent = hint ? `${text} — ${hint}` : text;
    box.classList.toggle("error", Boolean(isError));
  }

  fit();
  load(state.index, false);
})();
