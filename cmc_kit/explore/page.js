// Runs after Plotly.newPlot; the side panel below the plot may not be parsed yet.
function cmcExplorerInit() {
var gd = document.getElementById('{plot_id}');
var D = JSON.parse(document.getElementById('cmc-data').textContent);
var panel = document.getElementById('cmc-sample');
var selection = document.getElementById('cmc-selection');
var select = document.getElementById('cmc-colour-by');
var legend = document.getElementById('cmc-legend');
function esc(s) { return String(s).replace(/[&<>"]/g, function (c) {
  return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]; }); }
function fmt(v) {
  return (typeof v === 'number' && !Number.isInteger(v)) ? String(Number(v.toPrecision(4))) : v;
}
function showSample(i) {
  var out = '<div class="cmc-thumbs">';
  D.kinds.forEach(function (k) {
    out += '<figure><img alt="' + k + ' of ' + esc(D.ids[i]) + '" src="' + D.thumbs[k][i] +
           '"><figcaption>' + k + '</figcaption></figure>';
  });
  out += '</div><h3 id="cmc-sample-id">' + esc(D.ids[i]) + '</h3><table>';
  D.columns.forEach(function (c, j) {
    var v = D.meta[i][j];
    if (v !== null) out += '<tr><th>' + esc(c) + '</th><td>' + esc(fmt(v)) + '</td></tr>';
  });
  panel.innerHTML = out + '</table>';
}
function showLegend(c) {
  legend.innerHTML = c.legend.map(function (e) {
    return '<span class="cmc-item"><span class="cmc-swatch" style="background:' + e[1] +
           '"></span>' + esc(e[0]) + '</span>';
  }).join(' ');
}
function onPoint(ev) {
  if (ev && ev.points && ev.points.length && ev.points[0].curveNumber === 0)
    showSample(ev.points[0].pointNumber);
}
gd.on('plotly_hover', onPoint);
gd.on('plotly_click', onPoint);
gd.on('plotly_selected', function (ev) {
  if (!ev || !ev.points) { selection.innerHTML = ''; return; }
  var picked = ev.points.filter(function (p) { return p.curveNumber === 0; });
  var shown = picked.slice(0, D.maxGrid);
  selection.innerHTML = '<h3>' + picked.length + ' selected' +
    (picked.length > shown.length ? ' (first ' + shown.length + ' shown)' : '') +
    '</h3><div id="cmc-grid">' + shown.map(function (p) {
      return '<img title="' + esc(D.ids[p.pointNumber]) + '" data-index="' + p.pointNumber +
             '" src="' + D.thumbs.terrain[p.pointNumber] + '">';
    }).join('') + '</div>';
  selection.querySelectorAll('img').forEach(function (img) {
    img.addEventListener('click', function () { showSample(+img.dataset.index); });
  });
});
select.addEventListener('change', function () {
  var c = D.colourings[select.value];
  Plotly.restyle(gd, {'marker.color': [c.color], 'marker.colorscale': [c.colorscale],
                      'marker.showscale': [c.showscale],
                      'marker.colorbar.title.text': [c.title]}, [0]);
  showLegend(c);
});
showLegend(D.colourings[select.value]);
}
if (document.readyState === 'loading') {
  document.addEventListener('DOMContentLoaded', cmcExplorerInit);
} else {
  cmcExplorerInit();
}
