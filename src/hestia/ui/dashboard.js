// Hestia's dashboard: polls GET /v1/services and drives start/stop.  No
// dependencies, no build step: it must work offline, served by the gateway.
(function () {
  "use strict";
  var TOKEN_KEY = "hestia.token";
  var POLL_MS = 1000;
  var expanded = {};
  var busy = {};
  var $ = function (id) { return document.getElementById(id); };

  function headers(extra) {
    var h = { "Accept": "application/json" };
    var token = localStorage.getItem(TOKEN_KEY);
    if (token) { h["Authorization"] = "Bearer " + token; }
    for (var k in extra || {}) { h[k] = extra[k]; }
    return h;
  }

  function api(method, path) {
    return fetch("/v1" + path, { method: method, headers: headers(), cache: "no-store" }).then(function (r) {
      return r.text().then(function (text) {
        var body = null;
        try { body = text ? JSON.parse(text) : null; } catch (e) { body = { error: text }; }
        if (!r.ok) {
          var err = new Error((body && body.error) || ("HTTP " + r.status));
          err.status = r.status;
          throw err;
        }
        return body;
      });
    });
  }

  function message(text) {
    var m = $("message");
    m.textContent = text || "";
    m.hidden = !text;
  }

  function ago(iso) {
    if (!iso) { return "—"; }
    return duration((Date.now() - Date.parse(iso)) / 1000) + " ago";
  }

  function duration(seconds) {
    if (seconds < 0) { seconds = 0; }
    if (seconds < 60) { return Math.round(seconds) + " s"; }
    if (seconds < 3600) { return Math.floor(seconds / 60) + " min " + Math.round(seconds % 60) + " s"; }
    return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
  }

  function cell(row, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) { td.className = cls; }
    row.appendChild(td);
    return td;
  }

  function button(name, action, label, disabled) {
    var b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.dataset.action = action;
    b.dataset.service = name;
    b.disabled = disabled || !!busy[name];
    b.addEventListener("click", function (e) {
      e.stopPropagation();
      busy[name] = true;
      b.disabled = true;
      api("POST", "/services/" + encodeURIComponent(name) + "/" + action)
        .then(function () { message(""); })
        .catch(function (err) { message(action + " " + name + ": " + err.message + (err.status === 401 ? " (set the admin token)" : "")); })
        .then(function () { busy[name] = false; refresh(); });
    });
    return b;
  }

  function render(services) {
    var body = $("services").tBodies[0];
    body.textContent = "";
    var counts = {};
    services.forEach(function (s) {
      counts[s.state] = (counts[s.state] || 0) + 1;
      var row = document.createElement("tr");
      row.className = "service";
      row.dataset.service = s.name;
      row.addEventListener("click", function () { expanded[s.name] = !expanded[s.name]; refresh(); });
      var name = cell(row, s.name);
      name.title = s.url || "";
      var state = cell(row, "");
      var badge = document.createElement("span");
      badge.className = "state";
      badge.dataset.state = s.state;
      badge.textContent = s.state;
      badge.title = s.state_reason || "";
      state.appendChild(badge);
      state.dataset.state = s.state;
      cell(row, s.backend);
      cell(row, s.state === "ready" && s.state_since ? duration((Date.now() - Date.parse(s.state_since)) / 1000) : "—");
      cell(row, ago(s.last_request_at));
      cell(row, String(s.in_flight));
      cell(row, String(s.queued));
      cell(row, s.request_rate === undefined ? "—" : (s.request_rate * 60).toFixed(1));
      cell(row, s.last_error || "", "error");
      var actions = cell(row, "");
      var stoppable = s.state === "ready" || s.state === "starting" || s.state === "failed";
      actions.appendChild(button(s.name, "start", "Start", s.state === "ready" || s.state === "starting"));
      actions.appendChild(document.createTextNode(" "));
      actions.appendChild(button(s.name, "stop", "Stop", !stoppable || s.backend === "static"));
      if (s.restart_pending) {
        // A reload changed how it runs (issue 19): applied at its next start, or now with Restart.
        actions.appendChild(document.createTextNode(" "));
        var restart = button(s.name, "restart", "Restart", false);
        restart.title = "restart pending: " + (s.pending_changes || []).join(", ");
        actions.appendChild(restart);
      }
      body.appendChild(row);
      if (expanded[s.name]) {
        var more = document.createElement("tr");
        more.className = "events";
        var td = cell(more, "");
        td.colSpan = 10;
        var events = s.recent_events || [];
        if (!events.length) { td.textContent = "No state changes since the gateway started."; }
        var list = document.createElement("ul");
        events.slice().reverse().forEach(function (e) {
          var li = document.createElement("li");
          li.textContent = e.at + "  " + e.old + " → " + e.new + " (" + e.reason + ")" +
            (e.duration != null ? " in " + e.duration.toFixed(2) + " s" : "") + (e.error ? ": " + e.error : "");
          list.appendChild(li);
        });
        td.appendChild(list);
        body.appendChild(more);
      }
    });
    $("summary").textContent = services.length + " services · " + Object.keys(counts).sort().map(function (k) {
      return counts[k] + " " + k;
    }).join(", ");
    $("updated").textContent = new Date().toLocaleTimeString();
  }

  var timer = null;
  function refresh() {
    clearTimeout(timer);
    api("GET", "/services")
      .then(function (body) { render(body.services || []); })
      .catch(function (err) {
        message("Cannot read /v1/services: " + err.message + (err.status === 401 ? " (set the admin token)" : ""));
      })
      .then(function () { timer = setTimeout(refresh, POLL_MS); });
  }

  // -- costs and the 7-day timeline (GET /v1/costs, /v1/costs/timeline) --------
  var COSTS_MS = 5000;
  var SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs) {
    var el = document.createElementNS(SVG, tag);
    for (var k in attrs) { el.setAttribute(k, attrs[k]); }
    return el;
  }

  function timeline(name, spans, since, until) {
    var width = 700, height = 36, top = 14, bar = 16;
    var t0 = Date.parse(since), t1 = Date.parse(until);
    var x = function (t) { return Math.max(0, Math.min(width, (t - t0) / (t1 - t0) * width)); };
    var root = svg("svg", { "class": "timeline", viewBox: "0 0 " + width + " " + height, preserveAspectRatio: "none" });
    root.dataset.service = name;
    root.appendChild(svg("rect", { "class": "track", x: 0, y: top, width: width, height: bar }));
    for (var d = 1; d < 7; d++) {
      var at = t1 - d * 86400000;
      root.appendChild(svg("line", { "class": "day", x1: x(at), x2: x(at), y1: 2, y2: height - 2 }));
    }
    spans.forEach(function (s) {
      var a = x(Date.parse(s.start)), b = x(s.end ? Date.parse(s.end) : t1);
      var r = svg("rect", { "class": "span", x: a, y: top, width: Math.max(1, b - a), height: bar });
      r.dataset.reason = s.reason;
      var title = svg("title", {});
      title.textContent = s.unit + ": " + s.start + " → " + (s.end || "now") + " (" + s.reason + ")";
      r.appendChild(title);
      root.appendChild(r);
      if (s.reason === "request" || s.reason === "prewarm") {
        var cls = s.reason === "request" ? "mark-cold" : "mark-prewarm";
        var tip = Math.max(5, Math.min(width - 5, a));
        var m = svg("path", { "class": cls, d: "M" + (tip - 5) + " 2 l10 0 l-5 9 z" });
        var mt = svg("title", {});
        mt.textContent = (s.reason === "request" ? "cold start " : "prewarm start ") + s.start;
        m.appendChild(mt);
        root.appendChild(m);
      }
    });
    return root;
  }

  function money(value) { return (value || 0).toFixed(2); }

  function renderCosts(report, lines) {
    var body = $("costs").tBodies[0];
    body.textContent = "";
    var byName = {};
    (lines.services || []).forEach(function (s) { byName[s.name] = s.spans; });
    $("costs-since").textContent = "since " + report.since + " · " + report.currency;
    (report.services || []).forEach(function (s) {
      var row = document.createElement("tr");
      row.dataset.service = s.name;
      cell(row, s.name);
      cell(row, duration(s.running_seconds), "num running");
      cell(row, money(s.cost) + " " + report.currency, "num cost");
      cell(row, money(s.always_on_cost), "num always-on");
      cell(row, money(s.saved), "num saved");
      cell(row, String(s.starts), "num starts");
      cell(row, String(s.cold_starts), "num cold");
      cell(row, String(s.prewarm_starts), "num prewarm");
      var td = cell(row, "", "timeline-cell");
      td.appendChild(timeline(s.name, byName[s.name] || [], lines.since, lines.until));
      body.appendChild(row);
    });
  }

  var costsTimer = null;
  function refreshCosts() {
    clearTimeout(costsTimer);
    var period = $("period").value;
    Promise.all([api("GET", "/costs?period=" + encodeURIComponent(period)), api("GET", "/costs/timeline")])
      .then(function (both) { renderCosts(both[0], both[1]); })
      .catch(function (err) { message("Cannot read /v1/costs: " + err.message); })
      .then(function () { costsTimer = setTimeout(refreshCosts, COSTS_MS); });
  }
  $("period").addEventListener("change", refreshCosts);

  $("token").value = localStorage.getItem(TOKEN_KEY) || "";
  $("token-form").addEventListener("submit", function (e) {
    e.preventDefault();
    var value = $("token").value.trim();
    if (value) { localStorage.setItem(TOKEN_KEY, value); } else { localStorage.removeItem(TOKEN_KEY); }
    message("");
    refresh();
    refreshCosts();
  });
  refresh();
  refreshCosts();
})();
