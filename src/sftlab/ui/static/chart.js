// sftlab's line chart: SVG, no dependencies. lineChart(el, series, opts) draws series = [{name, color, points:
// [[x, y], ...], width, dash, dots}] with axes, a legend and a hover read-out of every series' nearest point.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function niceTicks(lo, hi, n) {
  if (!isFinite(lo) || !isFinite(hi)) return [];
  if (hi === lo) { hi = lo + 1; lo = lo - 1; }
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return (+v.toPrecision(4)).toString();
}

function lineChart(el, series, opts) {
  opts = opts || {};
  const W = opts.width || Math.max(320, el.clientWidth || 640), H = opts.height || 240, pad = {l: 56, r: 12, t: 12, b: 28};
  el.innerHTML = "";
  el.classList.add("chart");
  const all = series.flatMap(s => s.points).filter(p => p[1] !== null && isFinite(p[1]));
  const svg = svgEl("svg", {viewBox: `0 0 ${W} ${H}`, "data-points": series.length ? series[0].points.length : 0});
  if (opts.title) svg.setAttribute("aria-label", opts.title);
  el.appendChild(svg);
  if (!all.length) {
    const t = svgEl("text", {x: W / 2, y: H / 2, "text-anchor": "middle"});
    t.textContent = opts.empty || "no points yet";
    svg.appendChild(t);
    return;
  }
  let [x0, x1] = [Math.min(...all.map(p => p[0])), Math.max(...all.map(p => p[0]))];
  let [y0, y1] = [Math.min(...all.map(p => p[1])), Math.max(...all.map(p => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const ym = (y1 - y0) * 0.05 || Math.abs(y0) * 0.05 || 1; y0 -= ym; y1 += ym;
  const X = x => pad.l + (x - x0) / (x1 - x0) * (W - pad.l - pad.r);
  const Y = y => H - pad.b - (y - y0) / (y1 - y0) * (H - pad.t - pad.b);
  for (const t of niceTicks(y0, y1, 5)) {
    svg.appendChild(svgEl("line", {class: "grid", x1: pad.l, x2: W - pad.r, y1: Y(t), y2: Y(t)}));
    const lab = svgEl("text", {x: pad.l - 6, y: Y(t) + 4, "text-anchor": "end"}); lab.textContent = fmt(t);
    svg.appendChild(lab);
  }
  for (const t of niceTicks(x0, x1, 6).filter(t => opts.integerX === false || Number.isInteger(t))) {
    const lab = svgEl("text", {x: X(t), y: H - 8, "text-anchor": "middle"}); lab.textContent = fmt(t);
    svg.appendChild(lab);
  }
  svg.appendChild(svgEl("line", {class: "axis", x1: pad.l, x2: pad.l, y1: pad.t, y2: H - pad.b}));
  svg.appendChild(svgEl("line", {class: "axis", x1: pad.l, x2: W - pad.r, y1: H - pad.b, y2: H - pad.b}));
  series.forEach((s, i) => {
    const pts = s.points.filter(p => p[1] !== null && isFinite(p[1]));
    if (!pts.length) return;
    const d = pts.map((p, k) => (k ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1)).join(" ");
    svg.appendChild(svgEl("path", {d, fill: "none", stroke: s.color, "stroke-width": s.width || 1.5,
      "stroke-dasharray": s.dash || "", "data-series": s.name}));
    if (s.dots || pts.length === 1) for (const p of pts)
      svg.appendChild(svgEl("circle", {cx: X(p[0]), cy: Y(p[1]), r: 3, fill: s.color}));
  });
  const cursor = svgEl("line", {class: "axis", y1: pad.t, y2: H - pad.b, visibility: "hidden", "stroke-dasharray": "3 3"});
  svg.appendChild(cursor);
  const tip = document.getElementById("tooltip");
  svg.addEventListener("mousemove", ev => {
    const box = svg.getBoundingClientRect();
    const x = x0 + ((ev.clientX - box.left) * W / box.width - pad.l) / (W - pad.l - pad.r) * (x1 - x0);
    const lines = [];
    let at = null;
    for (const s of series) {
      let best = null;
      for (const p of s.points) if (p[1] !== null && (!best || Math.abs(p[0] - x) < Math.abs(best[0] - x))) best = p;
      if (best) { lines.push(`${s.name}: ${fmt(best[1])} (step ${best[0]})`); at = at === null ? best[0] : at; }
    }
    if (at === null) return;
    cursor.setAttribute("x1", X(at)); cursor.setAttribute("x2", X(at)); cursor.setAttribute("visibility", "visible");
    tip.textContent = lines.join("\n"); tip.hidden = false;
    tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 10) + "px";
  });
  svg.addEventListener("mouseleave", () => { cursor.setAttribute("visibility", "hidden"); tip.hidden = true; });
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const s of series) {
    const sp = document.createElement("span");
    sp.innerHTML = `<i style="background:${s.color}"></i>`;
    sp.appendChild(document.createTextNode(s.name));
    legend.appendChild(sp);
  }
  el.appendChild(legend);
}
