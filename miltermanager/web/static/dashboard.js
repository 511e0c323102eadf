// The dashboard's live part: polls /api/dashboard and redraws the numbers, the chart (inline
// SVG, no library) and the children's table, without reloading the page.
(function () {
  "use strict";

  var root = document.getElementById("dashboard");
  if (!root) {
    return;
  }
  var range = root.getAttribute("data-range") || "hour";
  var refresh = (parseFloat(root.getAttribute("data-refresh")) || 2) * 1000;
  var SVG = "http://www.w3.org/2000/svg";
  // Set once: a reload would make a new one (the tests check it survives).
  window.milterManagerDashboard = window.milterManagerDashboard || {
    loadedAt: Date.now(), updates: 0
  };

  function text(id, value) {
    var element = document.getElementById(id);
    if (element && element.textContent !== String(value)) {
      element.textContent = String(value);
    }
  }

  function number(value) {
    return value === null || value === undefined ? "\u2013" : String(value);
  }

  function el(name, attributes, content) {
    var element = document.createElement(name);
    Object.keys(attributes || {}).forEach(function (key) {
      element.setAttribute(key, attributes[key]);
    });
    if (content !== undefined) {
      element.textContent = content;
    }
    return element;
  }

  function svg(name, attributes) {
    var element = document.createElementNS(SVG, name);
    Object.keys(attributes || {}).forEach(function (key) {
      element.setAttribute(key, attributes[key]);
    });
    return element;
  }

  function repliesText(replies, order) {
    var labels = Object.keys(replies).sort(function (a, b) {
      var i = order.indexOf(a), j = order.indexOf(b);
      i = i < 0 ? order.length : i;
      j = j < 0 ? order.length : j;
      return i - j || (a < b ? -1 : a > b ? 1 : 0);
    });
    return labels.map(function (label) { return label + " " + replies[label]; })
      .join(", ") || "\u2013";
  }

  function drawCounts(data) {
    text("messages-total", data.messages.total);
    text("messages-since-start", data.totals.messages);
    text("sessions-total", data.totals.sessions);
    text("in-flight", data.totals.in_flight);
    var list = document.getElementById("verdict-counts");
    data.verdicts.forEach(function (label) {
      var count = data.messages.verdicts[label] || 0;
      var id = "verdict-count-" + label;
      if (!document.getElementById(id)) {
        var item = el("li", {"class": "verdict-count", "data-verdict": label});
        item.appendChild(el("span", {"class": "swatch v-" + label}));
        item.appendChild(document.createTextNode(label + " "));
        item.appendChild(el("span", {"class": "count", "id": id}, "0"));
        list.appendChild(item);
      }
      text(id, count);
    });
  }

  function drawChart(data) {
    var chart = document.getElementById("chart");
    var width = Math.max(chart.clientWidth || 0, 300), height = 220;
    var left = 40, bottom = 22, top = 8;
    var n = data.minutes, plot = width - left - 8;
    var totals = new Array(n).fill(0);
    var order = data.verdicts.filter(function (label) { return data.series[label]; });
    order.forEach(function (label) {
      data.series[label].forEach(function (count, i) { totals[i] += count; });
    });
    var highest = Math.max(1, Math.max.apply(null, totals));
    var scale = (height - top - bottom) / highest;
    var barWidth = plot / n;
    var image = svg("svg", {
      "width": width, "height": height, "viewBox": "0 0 " + width + " " + height,
      "role": "img", "id": "chart-svg", "class": "chart-svg",
      "aria-label": "messages per minute by verdict"
    });
    image.appendChild(svg("rect", {"x": left, "y": top, "width": plot,
      "height": height - top - bottom, "class": "plot"}));
    [0, highest].forEach(function (value) {
      var y = height - bottom - value * scale;
      image.appendChild(svg("line", {"x1": left, "x2": left + plot, "y1": y, "y2": y,
        "class": "grid"}));
      var label = svg("text", {"x": left - 4, "y": y + 4, "class": "axis",
        "text-anchor": "end"});
      label.textContent = String(value);
      image.appendChild(label);
    });
    var stacked = new Array(n).fill(0);
    order.forEach(function (label) {
      data.series[label].forEach(function (count, i) {
        if (!count) {
          return;
        }
        var h = count * scale;
        var y = height - bottom - (stacked[i] + count) * scale;
        stacked[i] += count;
        var bar = svg("rect", {"x": left + i * barWidth, "y": y,
          "width": Math.max(barWidth - (barWidth > 3 ? 1 : 0), 1), "height": h,
          "class": "bar v-" + label, "data-verdict": label, "data-minute": i});
        var title = svg("title", {});
        var at = new Date((data.start + i * data.step) * 1000);
        title.textContent = at.toLocaleTimeString() + ": " + count + " " + label;
        bar.appendChild(title);
        image.appendChild(bar);
      });
    });
    var first = svg("text", {"x": left, "y": height - 6, "class": "axis"});
    first.textContent = "\u2212" + (data.range === "day" ? "24 h" : "60 min");
    image.appendChild(first);
    var last = svg("text", {"x": left + plot, "y": height - 6, "class": "axis",
      "text-anchor": "end"});
    last.textContent = "now";
    image.appendChild(last);
    chart.replaceChildren ? chart.replaceChildren(image) : (chart.innerHTML = "",
      chart.appendChild(image));
  }

  function drawChildren(data) {
    var body = document.querySelector("#children tbody");
    var rows = document.createDocumentFragment();
    data.children.forEach(function (child) {
      var row = el("tr", {"class": "child-row", "data-child": child.name});
      var name = el("td", {"class": "name"}, child.name);
      if (child.evaluation_mode) {
        name.appendChild(document.createTextNode(" "));
        name.appendChild(el("span", {"class": "tag"}, "evaluation"));
      }
      row.appendChild(name);
      row.appendChild(el("td", {"class": "state state-" + child.state}, child.state));
      row.appendChild(el("td", {"class": "since"}, child.since || "\u2013"));
      row.appendChild(el("td", {"class": "failures"}, String(child.failures_in_row)));
      row.appendChild(el("td", {"class": "replies"}, repliesText(child.replies, data.verdicts)));
      row.appendChild(el("td", {"class": "fallbacks"}, String(child.fallbacks)));
      row.appendChild(el("td", {"class": "stops"}, String(child.stops)));
      row.appendChild(el("td", {"class": "p50"}, number(child.p50_ms)));
      row.appendChild(el("td", {"class": "p99"}, number(child.p99_ms)));
      rows.appendChild(row);
    });
    body.replaceChildren ? body.replaceChildren(rows) : (body.innerHTML = "",
      body.appendChild(rows));
  }

  function status(message, failed) {
    var element = document.getElementById("update-status");
    element.textContent = message;
    element.className = failed ? "error" : "";
  }

  function poll() {
    fetch("/api/dashboard?range=" + encodeURIComponent(range),
          {credentials: "same-origin", cache: "no-store", redirect: "manual",
           headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (response.type === "opaqueredirect" || response.status === 403) {
          throw new Error("the login has expired: reload the page to log in again");
        }
        if (!response.ok) {
          throw new Error("the manager answered " + response.status);
        }
        return response.json();
      })
      .then(function (data) {
        drawCounts(data);
        drawChart(data);
        drawChildren(data);
        text("updated", data.now);
        window.milterManagerDashboard.updates += 1;
        root.setAttribute("data-updates", String(window.milterManagerDashboard.updates));
        status("");
      })
      .catch(function (error) {
        status("(not updated: " + error.message + ")", true);
      })
      .then(function () {
        window.setTimeout(poll, refresh);
      });
  }

  poll();
}());
