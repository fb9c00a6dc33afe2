// Sorting for the table and expand/collapse for the gallery. Reads only the DOM.
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
  // Following a link to a plot inside a closed group opens the group first.
  function reveal() {
    var target = location.hash && document.getElementById(location.hash.slice(1));
    if (target) {
      var group = target.closest("details");
      if (group) { group.open = true; }
      var row = target.closest("tr");
      if (row && row.classList.contains("status-skipped")) {
        document.querySelector("table.sortable").classList.remove("hide-skipped");
      }
      target.scrollIntoView({ block: "center" });
    }
  }
  var toggle = document.getElementById("toggle-skipped");
  if (toggle) {
    var label = toggle.textContent;
    toggle.addEventListener("click", function () {
      var hidden = document.querySelector("table.sortable").classList.toggle("hide-skipped");
      toggle.setAttribute("aria-pressed", String(!hidden));
      toggle.textContent = hidden ? label : label.replace("Show", "Hide");
    });
  }
  window.addEventListener("hashchange", reveal);
  reveal();
}());
