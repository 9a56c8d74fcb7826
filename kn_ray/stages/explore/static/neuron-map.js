// The fact page's layer x neuron map, drawn by the vendored Chart.js (static/vendor) from the JSON
// the server put in #neuron-map-data: hover shows a neuron's numbers, a click opens its page.
(function () {
  const source = document.getElementById("neuron-map-data");
  const canvas = document.getElementById("neuron-map-canvas");
  if (!source || !canvas || typeof Chart === "undefined") return;
  const data = JSON.parse(source.textContent);
  const points = data.points;
  const name = (p) => "L" + p.y + " N" + p.x;
  const describe = (p) => name(p) + ": coarse in " + p.coarse + " of " + data.prompts + " prompts, mean score " +
    p.score.toPrecision(3) + " (" + p.rel.toFixed(2) + " x the prompt's max)" +
    (p.kn ? ", knowledge neuron" : "") + (p.act ? ", activation-baseline knowledge neuron" : "");
  const step = data.layers > 24 ? 2 : 1;
  new Chart(canvas, {
    type: "scatter",
    data: {
      datasets: [
        {label: "knowledge neuron (ig)", data: points.filter((p) => p.kn), pointRadius: 9, pointHoverRadius: 10,
         backgroundColor: "rgba(0,0,0,0)", borderColor: "#d62728", pointBorderWidth: 2, order: 1},
        {label: "knowledge neuron (activation baseline)", data: points.filter((p) => p.act), pointStyle: "crossRot",
         pointRadius: 7, borderColor: "#444444", pointBorderWidth: 1.5, order: 2},
        {label: "neuron (colour: mean share of the max; size: prompts where coarse)", data: points,
         pointBackgroundColor: points.map((p) => p.c), backgroundColor: points.length ? points[0].c : "#888",
         pointRadius: points.map((p) => p.r), pointHoverRadius: points.map((p) => p.r + 2), pointBorderWidth: 0, order: 3},
      ],
    },
    options: {
      animation: false,
      maintainAspectRatio: false,
      interaction: {mode: "nearest", intersect: true},
      scales: {
        x: {min: -0.5, max: data.width - 0.5, title: {display: true, text: "neuron"},
            afterBuildTicks: (axis) => { axis.ticks = axis.ticks.filter((t) => Number.isInteger(t.value)); }},
        y: {min: -0.7, max: data.layers - 0.3, title: {display: true, text: "layer"},
            afterBuildTicks: (axis) => {
              axis.ticks = [];
              for (let layer = 0; layer < data.layers; layer += step) axis.ticks.push({value: layer});
            }},
      },
      plugins: {
        legend: {position: "top", labels: {boxWidth: 12, font: {size: 11}}},
        tooltip: {callbacks: {label: (ctx) => describe(ctx.raw)},
                  filter: (item, index, items) => items.findIndex((other) => other.raw === item.raw) === index},
      },
      onClick: (event, elements, chart) => {
        if (!elements.length) return;
        const hit = elements[0];
        window.location.href = chart.data.datasets[hit.datasetIndex].data[hit.index].url;
      },
      onHover: (event, elements) => {
        event.native.target.style.cursor = elements.length ? "pointer" : "default";
      },
    },
  });
})();
