// Sorting for the table, expand/collapse for the gallery, the skipped-rows toggle and links
// that open and scroll to their target. Reads only the DOM.
(function () {
  "use strict";
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th, column) {
      th.addEventListener("click", function () {
        var numeric = th.dataset.type === "number";
        var ascending = !th.classList.contains("asc");
        Array.prototype.forEach.call(headers, function (h) { h.classList.remove("asc", "desc"); });
        th.classList.add(ascending ? "asc" : "desc");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        function key(row) {
          var cell = row.cells[column];
          var raw = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent;
          if (!numeric) { return raw; }
          var value = parseFloat(raw);
          return isNaN(value) ? null : value;
        }
        rows.sort(function (a, b) {
          var x = key(a), y = key(b);
          if (x === y) { return 0; }
          if (x === null) { return 1; }   // blanks last either way
          if (y === null) { return -1; }
          var order = numeric ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
          return ascending ? order : -order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
  function setAll(open) {
    document.querySelectorAll("details.group").forEach(function (d) { d.open = open; });
  }
  document.getElementById("expand").addEventListener("click", function () { setAll(true); });
  document.getElementById("collapse").addEventListener("click", function () { setAll(false); });
  var table = document.querySelector("table.sortable");
  var toggle = document.getElementById("toggle-skipped");
  var label = toggle ? toggle.textContent : "";
  function showSkipped(show) {
    if (!table) { return; }
    table.classList.toggle("hide-skipped", !show);
    if (toggle) {
      toggle.setAttribute("aria-pressed", String(show));
      toggle.textContent = show ? label.replace("Show", "Hide") : label;
    }
  }
  if (toggle) {
    toggle.addEventListener("click", function () {
      showSkipped(table.classList.contains("hide-skipped"));
    });
  }
  // Centred if it fits in the window (a plot, a row), else from its top (a section).
  function centre(target) {
    var fits = target.getBoundingClientRect().height < window.innerHeight;
    target.scrollIntoView({ block: fits ? "center" : "start" });
  }
  // Following a link (a row's name to its plot, a plot's caption to its row) opens what hides
  // the target (a closed group, the skipped rows) and centres it. Plots load lazily and have no
  // height until they do, so once the group's plots have loaded the target is centred again.
  function reveal() {
    var id = location.hash ? decodeURIComponent(location.hash.slice(1)) : "";
    var target = id && document.getElementById(id);
    if (!target) { return; }
    var group = target.closest("details");
    if (group) { group.open = true; }
    var row = target.closest("tr");
    if (row && row.classList.contains("status-skipped")) { showSkipped(true); }
    centre(target);
    if (!group) { return; }
    var waiting = 0;
    function loaded() {
      waiting -= 1;
      if (waiting === 0 && location.hash === "#" + id) { centre(target); }
    }
    Array.prototype.forEach.call(group.querySelectorAll("img"), function (img) {
      if (!img.complete) {
        waiting += 1;
        img.addEventListener("load", loaded, { once: true });
        img.addEventListener("error", loaded, { once: true });
      }
      img.loading = "eager";
    });
  }
  // A second click on the same link changes no hash: reveal again (the group may be closed).
  document.addEventListener("click", function (event) {
    var link = event.target.closest ? event.target.closest("a[href^='#']") : null;
    if (link && link.hash && link.hash === location.hash) {
      event.preventDefault();
      reveal();
    }
  });
  window.addEventListener("hashchange", reveal);
  reveal();
}());
