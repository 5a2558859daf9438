"""The flame graph's inline style and script: what flamegraph.pl's SVG does, no network.

Click a frame to zoom (it fills the width, its callees scale with it, its callers stay
below at full width, faded); "Reset Zoom" or Escape goes back. Zooming lays the subtree out
again as agent/render/tree.py does, so frames too narrow to show before appear once they
are wide enough; a click on a `[N small frames]` box spreads those frames over the width.
"Search" (or Ctrl-F) asks for a regular expression, paints the matching frames magenta and
shows the share of all samples under them ("Matched: 12.3%"): a match inside another match
is counted once.
Hovering a frame shows its name and samples at the bottom left. A graph taller than the
window opens scrolled to its bottom, where `all` and the processes are, and the title bar
(with the buttons) and the status line stay pinned to the window's edges.

The script learns the tree from the document: frames come in pre-order, so the depth
(from the row) gives each frame's parent and each frame's subtree is a contiguous range.
"""

from __future__ import annotations

STYLE = """
.frame { cursor: pointer; }
.frame text { pointer-events: none; }
.frame:hover rect { stroke: #000; stroke-width: 0.5; }
.frame.parent { opacity: 0.5; }
.button { cursor: pointer; fill: #333; }
.button:hover { text-decoration: underline; }
.hide { display: none; }
"""

# __WIDTH__ and co. are filled in from agent/render/flamegraph.py's layout.
SCRIPT = """
"use strict";
(function () {
  const WIDTH = __WIDTH__, MARGIN = __MARGIN__, ROW = __ROW__;
  const CHAR_WIDTH = __CHAR_WIDTH__, MIN_WIDTH = __MIN_WIDTH__, HEADER = __HEADER__;
  const MATCH_FILL = "rgb(230,0,230)", MERGED_FILL = "rgb(215,215,215)";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const byId = (id) => document.getElementById(id);
  const details = byId("details"), matched = byId("matched"), frameGroup = byId("frames");
  const unzoomButton = byId("unzoom"), searchButton = byId("search");
  const frames = [];  // pre-order, root first; merged boxes are not in here
  const svg = document.documentElement, background = byId("background");
  const header = byId("header"), footer = byId("footer");
  const svgWidth = parseFloat(svg.getAttribute("width"));
  const svgHeight = parseFloat(svg.getAttribute("height"));
  let zoomed = null, searchTerm = null, topY = Infinity, grown = 0;

  // One frame per <g>: its name and samples from the tooltip, its parent from the depth.
  function load() {
    const path = [];
    let rootY = null;
    for (const g of Array.from(frameGroup.children)) {
      const rect = g.querySelector("rect"), title = g.querySelector("title").textContent;
      const y = parseFloat(rect.getAttribute("y")), cut = title.lastIndexOf(" (");
      if (rootY === null) rootY = y;
      const depth = Math.round((rootY - y) / ROW);
      const frame = {
        g, rect, text: g.querySelector("text"), y, depth, title, name: title.slice(0, cut),
        count: parseInt(title.slice(cut + 2).replace(/,/g, ""), 10),
        fill: rect.getAttribute("fill"), parent: depth > 0 ? path[depth - 1] : null,
        children: [], merged: null, leftOut: [0, 0],
      };
      g.frame = frame;
      if (g.classList.contains("elided")) {
        frame.merged = true;
        frame.parent.merged = frame;
        continue;
      }
      const leftOut = g.getAttribute("data-left-out");
      if (leftOut) frame.leftOut = leftOut.split(" ").map(Number);
      if (frame.parent) frame.parent.children.push(frame);
      path.length = depth;
      path.push(frame);
      frames.push(frame);
    }
    frames.forEach((frame, i) => { frame.index = i; });
    // a frame's subtree is frames[index, end): walk backwards, children before parents
    frames.forEach((frame) => { frame.end = frame.index + 1; });
    for (let i = frames.length - 1; i > 0; i--) {
      const parent = frames[i].parent;
      parent.end = Math.max(parent.end, frames[i].end);
    }
  }

  // The name cut to fit: first by the average glyph width, then by the real font.
  function fitLabel(frame, width) {
    const room = Math.floor((width - 6) / CHAR_WIDTH);
    let text = room < 3 ? "" : frame.name.length <= room ? frame.name
      : frame.name.slice(0, room - 2) + "..";
    if (!frame.text) {
      if (!text) return;
      frame.text = document.createElementNS(SVG_NS, "text");
      frame.text.setAttribute("y", (frame.y + ROW - 4.5).toFixed(1));
      frame.g.appendChild(frame.text);
    }
    frame.text.setAttribute("x", (parseFloat(frame.rect.getAttribute("x")) + 3).toFixed(2));
    if (frame.text.textContent !== text) frame.text.textContent = text;
    while (text && frame.text.getComputedTextLength() > width - 6) {
      text = text.length > 5 ? text.slice(0, text.length - 3) + ".." : "";
      frame.text.textContent = text;
    }
  }

  function show(frame, x, width, faded) {
    topY = Math.min(topY, frame.y);
    frame.g.classList.remove("hide");
    frame.g.classList.toggle("parent", faded);
    frame.rect.setAttribute("x", x.toFixed(2));
    frame.rect.setAttribute("width", width.toFixed(2));
    fitLabel(frame, width);
  }

  function hideSubtree(frame) {
    for (let i = frame.index; i < frame.end; i++) {
      frames[i].g.classList.add("hide");
      if (frames[i].merged) frames[i].merged.g.classList.add("hide");
    }
  }

  // agent/render/tree.py's layout at `unit` px per sample: wide callees packed from the
  // left in name order, the narrow ones hidden and drawn as one merged box after them.
  function layout(frame, x, unit) {
    show(frame, x, frame.count * unit, false);
    placeCallees(frame, frame.children, frame.leftOut, x, unit);
  }

  function placeCallees(frame, callees, leftOut, x, unit) {
    const narrow = [];
    let narrowSamples = leftOut[1];
    for (const callee of callees) {
      if (callee.count * unit >= MIN_WIDTH) {
        layout(callee, x, unit);
        x += callee.count * unit;
      } else {
        hideSubtree(callee);
        narrow.push(callee);
        narrowSamples += callee.count;
      }
    }
    if (narrowSamples * unit < MIN_WIDTH) {
      if (frame.merged) frame.merged.g.classList.add("hide");
      return;
    }
    const merged = mergedBox(frame);
    merged.members = narrow;  // what a click on it spreads over the whole width
    merged.leftOut = leftOut;
    merged.count = narrowSamples;
    merged.name = "[" + (narrow.length + leftOut[0]) + " small frames]";
    merged.title = describe(merged.name, narrowSamples);
    merged.g.querySelector("title").textContent = merged.title;
    show(merged, x, narrowSamples * unit, false);
  }

  function describe(name, count) {
    const percent = (100 * count / frames[0].count).toFixed(2);
    return name + " (" + count.toLocaleString("en-US") + " samples, " + percent + "%)";
  }

  // The file has merged boxes for the scale it was drawn at; zooming can need others.
  function mergedBox(frame) {
    if (frame.merged) return frame.merged;
    const g = document.createElementNS(SVG_NS, "g"), rect = document.createElementNS(SVG_NS,
      "rect"), title = document.createElementNS(SVG_NS, "title");
    g.setAttribute("class", "frame elided");
    const y = frame.y - ROW;
    for (const [name, value] of [["y", y.toFixed(1)], ["height", ROW - 1], ["rx", 2],
      ["ry", 2], ["fill", MERGED_FILL]]) rect.setAttribute(name, value);
    g.append(title, rect);
    frameGroup.appendChild(g);
    frame.merged = { g, rect, text: null, y, parent: frame, merged: true, fill: MERGED_FILL };
    g.frame = frame.merged;
    return frame.merged;
  }

  // Rows above the drawn height (a zoom can show frames that were hidden up there) get
  // room above the title line: the picture grows upwards, the frames keep their y.
  function fitHeight() {
    grown = Math.max(0, HEADER - topY);
    svg.setAttribute("viewBox", "0 " + -grown + " " + svgWidth + " " + (svgHeight + grown));
    svg.setAttribute("height", svgHeight + grown);
    background.setAttribute("y", -grown);
    background.setAttribute("height", svgHeight + grown);
    pin();
  }

  // The header at the window's top and the footer at its bottom, wherever it scrolled.
  function pin() {
    header.setAttribute("transform", "translate(0," + (window.scrollY - grown) + ")");
    const below = svgHeight + grown - window.scrollY - window.innerHeight;
    footer.setAttribute("transform", "translate(0," + -Math.max(0, below) + ")");
  }

  // Only `target`'s callers (faded, full width) and what `draw` lays out stay visible.
  // The picture may grow upwards: scroll so that `anchor` stays where it was on screen.
  function zoomTo(target, callers, draw, anchor) {
    const before = anchor.getBoundingClientRect().top;
    zoomed = target;
    topY = Infinity;
    for (const frame of frames) {
      if (callers.has(frame)) show(frame, MARGIN, WIDTH, true);
      else frame.g.classList.add("hide");
      if (frame.merged) frame.merged.g.classList.add("hide");
    }
    draw();
    fitHeight();
    window.scrollBy(0, anchor.getBoundingClientRect().top - before);
    pin();
    unzoomButton.classList.toggle("hide", target === frames[0]);
  }

  function callersOf(frame) {
    const callers = new Set();
    for (let up = frame.parent; up; up = up.parent) callers.add(up);
    return callers;
  }

  function zoom(target) {
    const draw = () => layout(target, MARGIN, WIDTH / target.count);
    zoomTo(target, callersOf(target), draw, target.rect);
  }

  // A merged box's frames over the whole width (what is still too narrow, merged again).
  function zoomMerged(merged) {
    const { members, leftOut, count, parent } = merged;
    const draw = () => placeCallees(parent, members, leftOut, MARGIN, WIDTH / count);
    zoomTo(merged, callersOf(merged), draw, merged.rect);
  }

  function unzoom() {
    if (frames.length) zoom(frames[0]);
  }

  function search(term) {
    let pattern;
    try {
      pattern = new RegExp(term);
    } catch (error) {
      matched.textContent = "Not a regular expression: " + term;
      return;
    }
    const hit = frames.map((frame) => frame.depth > 0 && pattern.test(frame.name));
    frames.forEach((frame, i) => frame.rect.setAttribute("fill", hit[i] ? MATCH_FILL
      : frame.fill));
    let samples = 0;
    for (let i = 0; i < frames.length; ) {  // outermost matches only: skip their subtrees
      if (hit[i]) {
        samples += frames[i].count;
        i = frames[i].end;
      } else {
        i++;
      }
    }
    const total = frames.length ? frames[0].count : 0;
    searchTerm = term;
    matched.textContent = "Matched: " + (total ? (100 * samples / total).toFixed(1) : "0.0")
      + "% (" + samples.toLocaleString("en-US") + " of " + total.toLocaleString("en-US")
      + " samples)";
    searchButton.textContent = "Reset Search";
  }

  function resetSearch() {
    frames.forEach((frame) => frame.rect.setAttribute("fill", frame.fill));
    searchTerm = null;
    matched.textContent = "";
    searchButton.textContent = "Search";
  }

  function askSearch() {
    const term = prompt("Search (a regular expression, e.g. ^malloc|mutex):", searchTerm || "");
    if (term) search(term);
  }

  load();
  unzoom();  // the same layout as the file's, and every merged box learns its frames
  // A graph taller than the window opens at its bottom: `all` and the processes in sight.
  window.scrollTo(0, svg.getBoundingClientRect().height);
  pin();
  window.addEventListener("scroll", pin);
  window.addEventListener("resize", pin);
  frameGroup.addEventListener("click", (event) => {
    const g = event.target.closest("g.frame");
    if (!g) return;
    if (g.frame.merged !== true) {
      if (g.frame !== zoomed) zoom(g.frame);
    } else if (g.frame.members.length) {  // each click drills further into the tail
      zoomMerged(g.frame);
    }
  });
  frameGroup.addEventListener("mouseover", (event) => {
    const g = event.target.closest("g.frame");
    if (g) details.textContent = g.frame.title;
  });
  frameGroup.addEventListener("mouseout", () => { details.textContent = " "; });
  unzoomButton.addEventListener("click", unzoom);
  searchButton.addEventListener("click", () => (searchTerm === null ? askSearch()
    : resetSearch()));
  window.addEventListener("keydown", (event) => {
    if (((event.ctrlKey || event.metaKey) && event.key === "f") || event.key === "F3") {
      event.preventDefault();
      askSearch();
    } else if (event.key === "Escape") {
      resetSearch();
      unzoom();
    }
  });
  searchButton.classList.remove("hide");  // without script (an <img>) there is no button
})();
"""


def script(
    width: float,
    margin: float,
    frame_height: float,
    char_width: float,
    min_width: float,
    header: float,
) -> str:
    """The script with the layout's numbers filled in (no "]]>": it goes in a CDATA)."""
    values = {
        "WIDTH": width,
        "MARGIN": margin,
        "ROW": frame_height,
        "CHAR_WIDTH": char_width,
        "MIN_WIDTH": min_width,
        "HEADER": header,
    }
    text = SCRIPT
    for name, value in values.items():
        text = text.replace(f"__{name}__", repr(float(value)))  # the same double in JS
    return text
