"""The report page's inline style sheet and script (plain CSS and JavaScript, no library, no network).

    from pipeline.report.script import CSS, SCRIPT   # pasted into <style> and <script> by page.py

The script: the search box (``#search``) hides the rows of ``#explanations`` whose text does not
contain what is typed (case-insensitive), and says how many are shown; a click on a header of any
``table.sortable`` sorts by that column (numbers by the cell's ``data-v``; a second click reverses).
"""

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #1d1d1f; }
h1 { margin-bottom: .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
nav a { color: #3b6ea8; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; vertical-align: top; text-align: left; }
th { background: #f4f5f7; }
table.facts td:first-child { color: #555; white-space: nowrap; }
table.sortable th { cursor: pointer; user-select: none; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
table.rows td.prompt { max-width: 28em; color: #333; }
table.rows td.expl { max-width: 40em; }
table.rows tr:nth-child(even) { background: #fafafa; }
.err { color: #b3261e; font-size: 12px; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1em; }
figure { margin: 0; } figure img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #555; }
.missing { background: #fff6e5; border: 1px solid #f0c36d; padding: .5em 1em; margin: 1em 0; }
.note { color: #555; font-size: 13px; } .warn { color: #8a5300; }
#search { width: 28em; padding: 4px 8px; font-size: 14px; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: 12px; }
code { font-size: 12px; }
"""

SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("explanations");
  var search = document.getElementById("search");
  var shown = document.getElementById("shown");
  function filter() {
    if (!table) { return; }
    var q = search.value.trim().toLowerCase();
    var rows = table.tBodies[0].rows, n = 0;
    for (var i = 0; i < rows.length; i++) {
      var hit = !q || rows[i].textContent.toLowerCase().indexOf(q) !== -1;
      rows[i].hidden = !hit;
      if (hit) { n++; }
    }
    shown.textContent = n + " of " + rows.length + " rows shown";
  }
  if (search) { search.addEventListener("input", filter); filter(); }

  function key(cell, numeric) {
    if (!numeric) { return cell.textContent.toLowerCase(); }
    var v = parseFloat(cell.getAttribute("data-v"));
    return isNaN(v) ? null : v;
  }
  function sortBy(tbl, th, col) {
    var numeric = th.classList.contains("num");
    var desc = th.classList.contains("sorted-asc");
    var heads = tbl.tHead.rows[0].cells;
    for (var i = 0; i < heads.length; i++) { heads[i].classList.remove("sorted-asc", "sorted-desc"); }
    th.classList.add(desc ? "sorted-desc" : "sorted-asc");
    var body = tbl.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col], numeric), y = key(b.cells[col], numeric);
      if (x === y) { return 0; }
      if (x === null) { return 1; }   // empty cells last, either way
      if (y === null) { return -1; }
      return (x < y ? -1 : 1) * (desc ? -1 : 1);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (tbl) {
    Array.prototype.forEach.call(tbl.tHead.rows[0].cells, function (th, col) {
      th.addEventListener("click", function () { sortBy(tbl, th, col); });
    });
  });
})();
"""
