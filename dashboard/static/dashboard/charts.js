// Draws every figure of the page from the JSON the server put in #figures-data; a point whose
// customdata is a URL opens that row's page (the trade or cycle behind it).
(function () {
  var figures = JSON.parse(document.getElementById("figures-data").textContent);
  figures.forEach(function (fig) {
    var el = document.getElementById("fig-" + fig.key);
    if (!el) { return; }
    Plotly.newPlot(el, fig.data, fig.layout, {responsive: true, displaylogo: false});
    el.on("plotly_click", function (ev) {
      var point = ev.points && ev.points[0];
      var url = point && point.customdata;
      if (typeof url === "string" && url) { window.location.href = url; }
    });
  });
  document.body.setAttribute("data-charts-drawn", String(figures.length));
})();
