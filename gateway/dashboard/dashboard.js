// The txgateway dashboard: reads server-sent events from ./events and
// draws the latest requests, the request rate and latency over time, and
// backend states. No dependencies; every value is shown with textContent
// (paths and IDs come from clients and must never be parsed as HTML).
"use strict";

(function () {
  const MAX_ROWS = 100;
  const HISTORY = 300;
  const series = [];
  const $ = (id) => document.getElementById(id);

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function clock(t) {
    const d = new Date(t * 1000);
    return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  function ms(value) {
    if (value === null || value === undefined) return "–";
    return value < 10 ? value.toFixed(2) : value < 100 ? value.toFixed(1) : Math.round(value).toString();
  }

  function addRequests(rows, flash) {
    const body = $("requests").tBodies[0];
    for (const r of rows) {
      const tr = document.createElement("tr");
      tr.dataset.requestId = r.id;
      if (flash) tr.className = "new";
      cell(tr, clock(r.t));
      cell(tr, r.method);
      cell(tr, r.path, "path").title = r.path;
      cell(tr, r.route);
      cell(tr, r.backend);
      cell(tr, r.status, "status s" + String(r.status).charAt(0));
      cell(tr, ms(r.ms), "ms");
      cell(tr, r.cache);
      cell(tr, r.id, "id");
      body.insertBefore(tr, body.firstChild);
    }
    while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1);
  }

  function setBackends(backends) {
    const body = $("backends").tBodies[0];
    const rows = [];
    for (const b of backends) {
      const tr = document.createElement("tr");
      cell(tr, b.service);
      cell(tr, b.backend);
      cell(tr, b.healthy ? "healthy" : "unhealthy", b.healthy ? "healthy" : "unhealthy");
      cell(tr, b.circuit, b.circuit);
      cell(tr, b.active);
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  function setTotals(totals, dropped) {
    $("total-requests").textContent = totals.requests;
    $("total-errors").textContent = totals.errors;
    $("total-rate-limited").textContent = totals.rate_limited;
    $("total-cached").textContent = totals.cached;
    $("dropped").textContent = dropped;
  }

  function addPoint(point) {
    series.push(point);
    while (series.length > HISTORY) series.shift();
    $("rps").textContent = point.rps;
    $("p50").textContent = point.p50_ms === null ? "–" : ms(point.p50_ms) + " ms";
    $("p99").textContent = point.p99_ms === null ? "–" : ms(point.p99_ms) + " ms";
  }

  function chart(canvas, lines) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || canvas.width;
    const height = canvas.clientHeight || canvas.height;
    canvas.width = width * ratio;
    canvas.height = height * ratio;
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const left = 48, bottom = 18, top = 6, plotW = width - left - 6, plotH = height - top - bottom;
    let max = 0;
    for (const line of lines) for (const p of series) {
      const v = p[line.key];
      if (v !== null && v > max) max = v;
    }
    max = max > 0 ? max * 1.15 : 1;
    g.strokeStyle = "#e2e2e6";
    g.fillStyle = "#6b6b70";
    g.font = "11px system-ui, sans-serif";
    g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = top + plotH - (plotH * i) / 4;
      g.beginPath(); g.moveTo(left, y); g.lineTo(left + plotW, y); g.stroke();
      const label = (max * i) / 4;
      g.fillText(label >= 100 ? Math.round(label) : label.toFixed(label >= 10 ? 1 : 2), 4, y + 4);
    }
    g.fillText("−" + HISTORY + " s", left, height - 4);
    g.fillText("now", left + plotW - 22, height - 4);
    const step = plotW / (HISTORY - 1);
    const offset = HISTORY - series.length;
    for (const line of lines) {
      g.strokeStyle = line.color;
      g.lineWidth = 1.5;
      g.beginPath();
      let drawing = false;
      series.forEach((p, i) => {
        const v = p[line.key];
        if (v === null) { drawing = false; return; }
        const x = left + (offset + i) * step;
        const y = top + plotH - (plotH * v) / max;
        if (drawing) g.lineTo(x, y); else g.moveTo(x, y);
        drawing = true;
      });
      g.stroke();
      const last = series.length ? series[series.length - 1][line.key] : null;
      if (last !== null && last !== undefined) {  // the newest point, even alone
        g.fillStyle = line.color;
        g.beginPath();
        g.arc(left + (HISTORY - 1) * step, top + plotH - (plotH * last) / max, 2.5, 0, 2 * Math.PI);
        g.fill();
      }
    }
  }

  function draw() {
    const css = getComputedStyle(document.documentElement);
    chart($("rate-chart"), [{ key: "rps", color: css.getPropertyValue("--rate").trim() }]);
    chart($("latency-chart"), [
      { key: "p50_ms", color: css.getPropertyValue("--p50").trim() },
      { key: "p99_ms", color: css.getPropertyValue("--p99").trim() },
    ]);
  }

  function connected(up) {
    const state = $("connection");
    state.textContent = up ? "live" : "reconnecting…";
    state.className = "state " + (up ? "up" : "down");
  }

  function start() {
    const events = new EventSource("events");
    events.onopen = () => connected(true);
    events.onerror = () => connected(false);
    events.addEventListener("hello", (e) => {
      const hello = JSON.parse(e.data);
      $("requests").tBodies[0].replaceChildren();
      series.length = 0;
      addRequests(hello.requests, false);
      for (const p of hello.series) addPoint(p);
      setBackends(hello.backends);
      setTotals(hello.totals, hello.dropped);
      draw();
      connected(true);
    });
    events.addEventListener("requests", (e) => addRequests(JSON.parse(e.data), true));
    events.addEventListener("tick", (e) => {
      const tick = JSON.parse(e.data);
      addPoint(tick.point);
      setBackends(tick.backends);
      setTotals(tick.totals, tick.dropped);
      draw();
    });
    window.addEventListener("resize", draw);
  }

  start();
})();
