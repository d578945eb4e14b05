"""The live view's single page: HTML, CSS and a script that polls `/api/calls`.

Each call is a card with its transcript (customer and agent lines, partials
in grey until their final replaces them) and, once written, one `<audio>`
player per recording. `data-*` attributes make the page easy to inspect.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>callstream live view</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  header { background: #232f3e; color: #fff; padding: 12px 20px; font-size: 18px; }
  header small { color: #aab4c0; margin-left: 12px; font-size: 13px; }
  main { padding: 16px 20px; display: grid; gap: 16px;
         grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); }
  .call { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px #0002; padding: 12px 16px; }
  .call h2 { font-size: 14px; margin: 0 0 8px; font-family: ui-monospace, monospace; }
  .state { font: 12px system-ui; padding: 2px 8px; border-radius: 10px; margin-left: 8px; }
  .live { background: #d9f2e3; color: #0b6b36; } .ended { background: #e6e8eb; color: #444; }
  .line { display: flex; gap: 8px; margin: 3px 0; }
  .line time { color: #8a93a0; font: 12px ui-monospace, monospace; min-width: 52px; }
  .who { font-weight: 600; min-width: 84px; flex-shrink: 0; }
  .customer .who { color: #0b5cad; } .agent .who { color: #b35c00; }
  .partial .text { color: #9aa3ad; font-style: italic; }
  .recordings { margin-top: 10px; border-top: 1px solid #eee; padding-top: 8px; }
  .recordings div { display: flex; align-items: center; gap: 8px; }
  audio { height: 32px; width: 360px; }
  .empty { color: #777; }
</style>
</head>
<body>
<header>callstream live view<small id="status">connecting...</small></header>
<main id="calls"><p class="empty">No calls yet.</p></main>
<script>
"use strict";
let version = -1;
const players = new Map();

function stamp(ms) {
  const s = ms / 1000;
  return String(Math.floor(s / 60)).padStart(2, "0") + ":" + (s % 60).toFixed(1).padStart(4, "0");
}

function player(key) {
  if (!players.has(key)) {
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.preload = "metadata";
    audio.dataset.key = key;
    audio.addEventListener("loadedmetadata", () => {
      audio.dataset.duration = String(audio.duration);
    });
    audio.src = "/recordings/" + encodeURIComponent(key);
    players.set(key, audio);
  }
  return players.get(key);
}

const cards = new Map();

function lineRow(line) {
  const row = document.createElement("div");
  row.className = `line ${line.speaker}` + (line.partial ? " partial" : " final");
  row.dataset.segment = line.segment_id;
  row.innerHTML = '<time></time><span class="who"></span><span class="text"></span>';
  row.querySelector("time").textContent = stamp(line.start_ms);
  row.querySelector(".who").textContent = line.speaker;
  row.querySelector(".text").textContent = line.text;
  return row;
}

// A call's section is built once and updated in place, so its players are never
// taken out of the page (that would pause a recording being listened to).
function card(call) {
  let el = cards.get(call.contact_id);
  if (!el) {
    el = document.createElement("section");
    el.className = "call";
    el.dataset.contact = call.contact_id;
    el.innerHTML = '<h2></h2><div class="lines"></div><div class="recordings" hidden></div>';
    cards.set(call.contact_id, el);
  }
  const state = call.ended ? `<span class="state ended">ended: ${call.ended}</span>`
                           : '<span class="state live">live</span>';
  el.querySelector("h2").textContent = call.contact_id;
  el.querySelector("h2").insertAdjacentHTML("beforeend", state);
  el.querySelector(".lines").replaceChildren(...call.lines.map(lineRow));
  const box = el.querySelector(".recordings");
  for (const [speaker, key] of Object.entries(call.recordings)) {
    if (players.has(key)) continue;
    const row = document.createElement("div");
    row.innerHTML = '<span class="who"></span>';
    row.querySelector(".who").textContent = speaker;
    row.appendChild(player(key));
    box.appendChild(row);
    box.hidden = false;
  }
  return el;
}

function place(main, sections) {
  const same = sections.length === main.children.length &&
               sections.every((el, i) => main.children[i] === el);
  if (!same) main.replaceChildren(...sections);
}

async function refresh() {
  try {
    const response = await fetch("/api/calls?after=" + version);
    const board = await response.json();
    document.getElementById("status").textContent = "live, " + board.calls.length + " call(s)";
    if (board.version !== version) {
      version = board.version;
      const main = document.getElementById("calls");
      if (board.calls.length) place(main, board.calls.map(card));
    }
  } catch (error) {
    document.getElementById("status").textContent = "reconnecting: " + error;
  }
  setTimeout(refresh, 500);
}
refresh();
</script>
</body>
</html>
"""
