// The scatter plot of `map`: colour by label with a legend, wheel to zoom, drag to pan,
// shift-drag to select a box, hover for a preview. The web app and `map --html` both draw with it.
// Plain canvas, no library: a few thousand points (MAP_MAX_POINTS) draw in a millisecond or two.

// Kelly's 22 colours of maximum contrast (1965) less white: a qualitative palette, whose colours
// differ in lightness and saturation as well as hue. 21 hues of one saturation and lightness
// (the map's first palette) could not be told apart. Past 21 labels, hues again at three lightnesses.
const MAP_PALETTE = ["#222222", "#F3C300", "#875692", "#F38400", "#A1CAF1", "#BE0032", "#C2B280", "#848482",
                     "#008856", "#E68FAC", "#0067A5", "#F99379", "#604E97", "#F6A600", "#B3446C", "#DCD300",
                     "#882D17", "#8DB600", "#654522", "#E25822", "#2B3D26"];
function labelColour(index, count) {
  if (count === 1) return "#0067A5";
  if (index < MAP_PALETTE.length) return MAP_PALETTE[index];
  const extra = index - MAP_PALETTE.length;
  return `hsl(${(extra * 137) % 360}, 70%, ${[35, 55, 72][extra % 3]}%)`;
}

function drawMap(canvas, tip, points, imageOf, options = {}) {
  const ctx = canvas.getContext("2d"), pad = 20;
  const xs = points.map(p => p.x), ys = points.map(p => p.y);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const labels = [...new Set(points.map(p => p.label || ""))];
  const colourOf = new Map(labels.map((label, index) => [label, labelColour(index, labels.length)]));
  const colour = l => colourOf.get(l || "");
  // The view: data -> canvas through a zoom and an offset (canvas pixels).
  const view = {zoom: 1, dx: 0, dy: 0};
  const baseX = p => pad + (p.x - x0) / ((x1 - x0) || 1) * (canvas.width - 2 * pad);
  const baseY = p => pad + (p.y - y0) / ((y1 - y0) || 1) * (canvas.height - 2 * pad);
  const px = p => baseX(p) * view.zoom + view.dx, py = p => baseY(p) * view.zoom + view.dy;
  let selected = new Set(), box = null;

  function draw() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    for (const p of points) {
      const x = px(p), y = py(p);
      if (x < -4 || y < -4 || x > canvas.width + 4 || y > canvas.height + 4) continue;
      ctx.fillStyle = colour(p.label);
      const r = selected.has(p) ? 4 : 2;
      ctx.fillRect(x - r, y - r, 2 * r, 2 * r);
      if (selected.has(p)) { ctx.strokeStyle = "#000"; ctx.strokeRect(x - r, y - r, 2 * r, 2 * r); }
    }
    if (box) { ctx.strokeStyle = "#1f5fbf"; ctx.setLineDash([4, 3]);
               ctx.strokeRect(box.x, box.y, box.w, box.h); ctx.setLineDash([]); }
  }
  const canvasPoint = e => { const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height]; };
  function nearest(mx, my) {
    let best = null, bestD = 64;
    for (const p of points) { const d = (px(p) - mx) ** 2 + (py(p) - my) ** 2; if (d < bestD) { best = p; bestD = d; } }
    return best;
  }
  function zoomAt(factor, mx, my) {
    const zoom = Math.min(64, Math.max(1, view.zoom * factor));
    view.dx = mx - (mx - view.dx) * zoom / view.zoom; view.dy = my - (my - view.dy) * zoom / view.zoom;
    view.zoom = zoom; if (zoom === 1) { view.dx = 0; view.dy = 0; }
    draw();
  }
  function reset() { view.zoom = 1; view.dx = 0; view.dy = 0; draw(); }
  // The keyboard too (the canvas takes focus with Tab): + and - zoom at the centre, arrows pan, 0 resets.
  canvas.tabIndex = 0;
  canvas.addEventListener("keydown", e => {
    const step = 40, centre = [canvas.width / 2, canvas.height / 2];
    const pan = {ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step], ArrowDown: [0, -step]}[e.key];
    if (e.key === "+" || e.key === "=") zoomAt(1.25, ...centre);
    else if (e.key === "-") zoomAt(0.8, ...centre);
    else if (e.key === "0") reset();
    else if (pan) { view.dx += pan[0]; view.dy += pan[1]; draw(); }
    else return;
    e.preventDefault();
  });
  canvas.onwheel = e => { e.preventDefault(); const [mx, my] = canvasPoint(e); zoomAt(e.deltaY < 0 ? 1.25 : 0.8, mx, my); };
  let drag = null;
  canvas.onmousedown = e => { const [mx, my] = canvasPoint(e); drag = {mx, my, dx: view.dx, dy: view.dy, select: e.shiftKey, moved: false}; };
  window.addEventListener("mouseup", () => {
    if (drag && drag.select && box) {
      const [bx0, bx1] = [Math.min(box.x, box.x + box.w), Math.max(box.x, box.x + box.w)];
      const [by0, by1] = [Math.min(box.y, box.y + box.h), Math.max(box.y, box.y + box.h)];
      selected = new Set(points.filter(p => px(p) >= bx0 && px(p) <= bx1 && py(p) >= by0 && py(p) <= by1));
      box = null; draw();
      if (options.onSelect) options.onSelect([...selected]);
    }
    if (drag) canvas.dataset.dragged = drag.moved ? "1" : "";
    drag = null;
  });
  canvas.onmousemove = e => {
    const [mx, my] = canvasPoint(e);
    if (drag) {
      drag.moved = drag.moved || Math.abs(mx - drag.mx) + Math.abs(my - drag.my) > 3;
      if (drag.select) box = {x: drag.mx, y: drag.my, w: mx - drag.mx, h: my - drag.my};
      else { view.dx = drag.dx + mx - drag.mx; view.dy = drag.dy + my - drag.my; }
      tip.style.display = "none"; draw(); return;
    }
    const best = nearest(mx, my);
    if (!best) { tip.style.display = "none"; return; }
    tip.replaceChildren();
    const src = imageOf(best);
    if (src) { const img = document.createElement("img"); img.src = src; img.style.maxWidth = "128px"; tip.append(img); }
    const caption = document.createElement("div"); caption.textContent = best.name + (best.label ? " (" + best.label + ")" : "");
    tip.append(caption);
    tip.dataset.id = best.id ?? "";
    tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; tip.style.display = "block";
  };
  canvas.onmouseleave = () => { tip.style.display = "none"; };
  if (options.legend) {
    options.legend.replaceChildren(...labels.map(label => {
      const item = document.createElement("span"), swatch = document.createElement("i");
      swatch.style.cssText = `display:inline-block;width:10px;height:10px;margin-right:4px;background:${colour(label)}`;
      // One unit: a line may break between legend items, never between a swatch and its name.
      item.style.cssText = "display:inline-block;white-space:nowrap;margin-right:1em";
      item.append(swatch, label || "(no folder)");
      item.dataset.label = label;
      return item;
    }));
  }
  draw();
  return {positionOf: p => [px(p), py(p)], zoomAt, reset, labels, colour, get zoom() { return view.zoom; },
          select(chosen) { selected = new Set(chosen); draw(); }, get selected() { return [...selected]; }};
}
