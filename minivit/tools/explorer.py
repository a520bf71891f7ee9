"""An attention explorer in the browser: one self-contained HTML page (no server, no network, no external script).

The page shows the image; under the pointer, the last block's attention of the patch it hovers (any query patch,
not only CLS) over all patches, for the head picked in a selector or averaged over the heads, and beside it that
query's map for every head; below, DINO's CLS maps per head and their 60%-mass masks (attention_maps.py).

What it holds: the last block's softmax attention (heads, 1+N queries, N patch keys; the CLS key's column is left
out as in DINO's maps), each row divided by its maximum and quantised to uint8 (the maps are shown relative to
their maximum: 1/255 of it is below what a colour map shows), the row maxima as float32 so that the mean over heads
is exact up to that rounding, the masks as uint8, the image as a PNG, all base64. ViT-S/8 on a 224-px image:
784 patches, 6 x 785 x 784 bytes = 3.7 MB (4.9 MB of base64). The attention grows as N^2: check_size refuses pages
above MAX_BYTES with the --image_size that fits.

    python -m minivit.tools.attention_maps --arch vit_s8 --weights dino_deitsmall8_pretrain.pth --image cat.jpg \
        --image_size 224 --html cat.html          # open cat.html; cat.html#patch=5,9&head=2 opens at that patch
"""
import base64
import io
import json

import numpy as np
import torch
from PIL import Image

MAX_BYTES = 48 * 2**20  # quantised attention in one page: browsers open ~64 MB of base64 without trouble


def quantise_rows(attn):
    """Last-block attention (heads, 1+N, 1+N) float -> (q (heads, 1+N, N) uint8, row_max (heads, 1+N) float32).

    Row i, key j (patch keys only): q = round(255 * a_ij / max_j a_ij), so a_ij ~= q / 255 * row_max[i]."""
    rows = attn[:, :, 1:].double()                                            # (heads, 1+N, N): drop the CLS key
    row_max = rows.amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)   # (heads, 1+N)
    q = torch.round(255 * rows / row_max[..., None]).to(torch.uint8)
    return q, row_max.float()


def check_size(heads, num_patches, patch_size, image_size):
    """ValueError, one line, when the quantised attention would exceed MAX_BYTES; names an --image_size that fits."""
    size = heads * (num_patches + 1) * num_patches
    if size > MAX_BYTES:
        side = int((MAX_BYTES / heads) ** 0.25) * patch_size  # N ~ (side / p)^2 patches, N^2 bytes per head
        raise ValueError(f"--html: the attention of {num_patches} patches x {heads} heads is {size / 2**20:.0f} MB, "
                         f"more than a page should hold ({MAX_BYTES / 2**20:.0f} MB); use --image_size {side} or "
                         f"less (now {image_size})")


def colormap_lut(name="inferno"):
    """256 RGB colours of a matplotlib colour map -> (256, 3) uint8; index k shows the value k / 255."""
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def _b64(array) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _png_data_url(image) -> str:
    """(3, H, W) float in [0, 1] -> a data: URL of its PNG."""

    pixels = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def explorer_html(image, attn, masks, patch_size, title="", mass=0.6):
    """The page as a string. image: (3, H, W) float in [0, 1]; attn: (heads, 1+N, 1+N) last-block softmax
    attention with N = (H/p)(W/p) in raster order; masks: (heads, H/p, W/p) bool, the CLS maps' mass masks."""
    heads, n_tokens, _ = attn.shape
    H, W = image.shape[-2:]
    h, w = H // patch_size, W // patch_size
    if h * w + 1 != n_tokens or masks.shape != (heads, h, w):
        raise ValueError(f"attention {tuple(attn.shape)} and masks {tuple(masks.shape)} do not fit a {H}x{W} image "
                         f"in {patch_size}-px patches ({h}x{w} + CLS)")
    q, row_max = quantise_rows(attn.cpu())
    data = {"title": title, "H": H, "W": W, "p": patch_size, "h": h, "w": w, "heads": heads, "mass": mass,
            "image": _png_data_url(image.cpu().float()), "attn": _b64(q.numpy()),
            "rowMax": _b64(row_max.numpy().astype("<f4")), "masks": _b64(masks.cpu().numpy().astype(np.uint8)),
            "lut": _b64(colormap_lut())}
    return PAGE.replace("{{TITLE}}", _escape(title)).replace("{{DATA}}", json.dumps(data).replace("</", "<\\/"))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_explorer(path, image, attn, masks, patch_size, title="", mass=0.6):
    """Write explorer_html(...) to path; returns path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(explorer_html(image, attn, masks, patch_size, title, mass))
    return path


# The page. Data in the JSON block; the script decodes it once, then each pointer move repaints the maps of one
# query row. The main overlay canvas holds exactly the colour-map pixels (its transparency is CSS), one colour per
# patch, so what it shows can be read back (tests/test_explorer.py does, in headless Chromium).
PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}}</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
.row { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
.side { max-width: 480px; }
#stage { position: relative; cursor: crosshair; line-height: 0; }
#stage canvas { position: absolute; left: 0; top: 0; image-rendering: pixelated; }
#stage #img { position: static; }
#overlay { opacity: 0.65; }
.tiles { display: flex; gap: 8px; flex-wrap: wrap; }
.tile { text-align: center; font-size: 12px; cursor: pointer; }
.tile canvas { display: block; image-rendering: pixelated; border: 2px solid transparent; }
.tile.on canvas { border-color: #e33; }
</style></head><body>
<h2>{{TITLE}}</h2>
<div class="row">
  <div id="stage"><canvas id="img"></canvas><canvas id="overlay"></canvas><canvas id="marker"></canvas></div>
  <div class="side">
    <p><label>head <select id="head"></select></label></p>
    <p id="info">move the pointer over the image</p>
    <div id="queryTiles" class="tiles"></div>
  </div>
</div>
<h3 id="clsTitle"></h3>
<div id="clsTiles" class="tiles"></div>
<script type="application/json" id="data">{{DATA}}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const bytes = s => Uint8Array.from(atob(s), c => c.charCodeAt(0));
const A = bytes(D.attn), LUT = bytes(D.lut), MASKS = bytes(D.masks);
const ROWMAX = new Float32Array(bytes(D.rowMax).buffer);
const N = D.h * D.w, Q = N + 1;                        // patch keys; queries = CLS + patches
const S = Math.max(1, Math.floor(560 / Math.max(D.H, D.W)));   // integer display scale
const image = new Image();
let head = -1, query = 0;                              // -1 = mean over heads; query 0 = CLS

// the colour-map index (0..255) of every patch for one head (or the mean) and one query row
function mapOf(h, q) {
  if (h >= 0) return A.subarray((h * Q + q) * N, (h * Q + q + 1) * N);
  const m = new Float64Array(N);
  for (let k = 0; k < D.heads; k++) {
    const row = (k * Q + q) * N, s = ROWMAX[k * Q + q] / 255;
    for (let j = 0; j < N; j++) m[j] += A[row + j] * s;
  }
  let max = 0;
  for (let j = 0; j < N; j++) max = Math.max(max, m[j]);
  return Uint8Array.from(m, v => Math.round(255 * v / max));
}
// one pixel per patch, in colour-map colours (opaque), on a w x h canvas
function gridCanvas(idx, mask) {
  const c = document.createElement("canvas");
  c.width = D.w; c.height = D.h;
  const ctx = c.getContext("2d"), im = ctx.createImageData(D.w, D.h);
  for (let j = 0; j < N; j++) {
    const k = idx ? idx[j] : 0;
    im.data.set(mask ? [0, 0, 0] : [LUT[3 * k], LUT[3 * k + 1], LUT[3 * k + 2]], 4 * j);
    im.data[4 * j + 3] = mask ? (mask[j] ? 0 : 190) : 255;
  }
  ctx.putImageData(im, 0, 0);
  return c;
}
function paint(canvas, grid, withImage, alpha) {
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (withImage && image.complete) ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = alpha;
  ctx.drawImage(grid, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
}
function tile(parent, label, onclick) {
  const t = document.createElement("div"), c = document.createElement("canvas");
  const side = Math.max(D.H, D.W);                     // tiles 60 px on their longer side, drawn at 2x
  t.className = "tile"; c.width = 2 * Math.round(60 * D.W / side); c.height = 2 * Math.round(60 * D.H / side);
  c.style.width = c.width / 2 + "px"; c.style.height = c.height / 2 + "px";
  t.append(c, label); if (onclick) t.onclick = onclick; parent.append(t);
  return c;
}
const stage = document.getElementById("stage"), overlay = document.getElementById("overlay");
const marker = document.getElementById("marker"), select = document.getElementById("head");
for (const c of stage.querySelectorAll("canvas")) { c.width = D.W * S; c.height = D.H * S; }
const qTiles = [];
for (let k = -1; k < D.heads; k++) {
  select.add(new Option(k < 0 ? "mean of the heads" : "head " + k, k));
  qTiles.push(tile(document.getElementById("queryTiles"), k < 0 ? "mean" : "head " + k, () => setHead(k)));
}
function draw() {
  paint(overlay, gridCanvas(mapOf(head, query)), false, 1);
  qTiles.forEach((c, i) => { paint(c, gridCanvas(mapOf(i - 1, query)), true, 0.6);
                             c.parentNode.classList.toggle("on", i - 1 === head); });
  const m = marker.getContext("2d");
  m.clearRect(0, 0, marker.width, marker.height);
  const r = Math.floor((query - 1) / D.w), c = (query - 1) % D.w;
  if (query > 0) { m.strokeStyle = "#0f0"; m.lineWidth = 2; m.strokeRect(c * D.p * S, r * D.p * S, D.p * S, D.p * S); }
  const name = head < 0 ? "the mean of the " + D.heads + " heads" : "head " + head;
  document.getElementById("info").textContent = (query > 0 ? "query patch (" + r + ", " + c + ")" : "query CLS") +
    ", " + name + "; colours relative to the map's maximum";
  stage.dataset.query = query; stage.dataset.head = head;
}
function setHead(k) { head = k; select.value = k; draw(); }
select.onchange = () => setHead(+select.value);
stage.addEventListener("pointermove", e => {
  const b = overlay.getBoundingClientRect();
  const c = Math.floor((e.clientX - b.left) / b.width * D.w), r = Math.floor((e.clientY - b.top) / b.height * D.h);
  if (r < 0 || c < 0 || r >= D.h || c >= D.w || 1 + r * D.w + c === query) return;
  query = 1 + r * D.w + c; draw();
});
document.getElementById("clsTitle").textContent = "CLS attention per head, and the patches holding " +
  Math.round(100 * D.mass) + "% of its mass";
const clsTiles = document.getElementById("clsTiles");
const clsPaint = [];
for (let k = 0; k < D.heads; k++) {
  const map = tile(clsTiles, "head " + k, () => setHead(k)), mask = tile(clsTiles, k + ": mask", () => setHead(k));
  clsPaint.push(() => { paint(map, gridCanvas(mapOf(k, 0)), true, 0.6);
                        paint(mask, gridCanvas(null, MASKS.subarray(k * N, (k + 1) * N)), true, 1); });
}
const hash = new URLSearchParams(location.hash.slice(1));   // #patch=r,c&head=k opens there
if (hash.has("patch")) { const [r, c] = hash.get("patch").split(",").map(Number); query = 1 + r * D.w + c; }
if (hash.has("head")) head = +hash.get("head");
image.onload = () => {
  const ctx = document.getElementById("img").getContext("2d");
  ctx.drawImage(image, 0, 0, D.W * S, D.H * S);
  clsPaint.forEach(f => f()); draw();
};
image.src = D.image;
select.value = head; draw();
</script></body></html>
"""
