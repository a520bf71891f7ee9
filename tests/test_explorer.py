"""The attention explorer (minivit/tools/explorer.py, `python -m minivit.tools.attention_maps --html`): the page's data decode
to the model's attention, and in a real browser (headless Chromium) hovering two patches draws two different maps,
each the model's attention row of the hovered patch in the page's colour map, per head and averaged."""
import base64
import html
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_command
from minivit.tools.attention_maps import cls_attention_maps, load_image, main, mass_threshold_masks
from minivit.augment import normalize
from minivit.tools.explorer import check_size, colormap_lut, quantise_rows
from minivit.models import build_model

pytestmark = pytest.mark.usefixtures("reference_kernels")

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
H, W, P = 48, 64, 8  # a non-square image: 6 x 8 patches
ROWS, COLS = H // P, W // P


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    """A ViT-Ti/8 with random weights of std 0.05 (peaked attention rows, unlike the 0.02 init), saved as our
    checkpoint; a noise image; the page written by the command line; and the model's last-block attention."""
    out = tmp_path_factory.mktemp("explorer")
    torch.manual_seed(0)
    model = build_model("vit_ti16", patch_size=P).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.05)
    torch.save(model.state_dict(), out / "weights.pth")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(out / "noise.png")
    page = out / "page.html"
    main(["--arch", "vit_ti16", "--patch_size", str(P), "--weights", str(out / "weights.pth"), "--image",
          str(out / "noise.png"), "--image_size", str(H), "--html", str(page), "--device", "cpu"])
    batch = normalize(load_image(out / "noise.png", H, P)[None])
    attn = model.get_last_selfattention(batch)[0].double()                         # (heads, 1+N, 1+N)
    masks = mass_threshold_masks(cls_attention_maps(model, batch)[0], 0.6)
    return page, attn, masks


def page_data(page):
    text = page.read_text()
    return text, json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)[1])


def expected_indices(attn, query, head):
    """The colour-map index (0..255) of every patch the page must draw for one query row: the row over the patch
    keys relative to its maximum, for one head or for the mean over the heads."""
    row = attn[:, query, 1:].mean(0) if head < 0 else attn[head, query, 1:]
    return torch.round(255 * row / row.max()).long()


def test_page_is_self_contained_and_its_data_is_the_attention(explorer):
    page, attn, masks = explorer
    text, data = page_data(page)
    outside = text.replace(re.search(r'id="data">(.*?)</script>', text, re.S)[1], "")
    assert "http" not in outside and "<script src" not in outside and "<link" not in outside  # nothing fetched
    heads, N = attn.shape[0], ROWS * COLS
    assert (data["H"], data["W"], data["h"], data["w"], data["heads"]) == (H, W, ROWS, COLS, 3)
    q = np.frombuffer(base64.b64decode(data["attn"]), np.uint8).reshape(heads, N + 1, N)
    row_max = np.frombuffer(base64.b64decode(data["rowMax"]), "<f4").reshape(heads, N + 1)
    decoded = torch.from_numpy(q / 255.0 * row_max[..., None])                      # (heads, 1+N, N)
    assert (decoded - attn[:, :, 1:]).abs().max() <= row_max.max() / 510 + 1e-6    # half a quantisation step
    stored = np.frombuffer(base64.b64decode(data["masks"]), np.uint8).reshape(heads, ROWS, COLS)
    assert np.array_equal(stored.astype(bool), masks.numpy())
    assert page.stat().st_size < 60_000  # 3 x 49 x 48 bytes of attention, the PNG and the page itself


def test_quantise_rows_and_size_guard():
    attn = torch.softmax(torch.randn(2, 5, 5, dtype=torch.float64), -1)
    q, row_max = quantise_rows(attn)
    assert q.dtype == torch.uint8 and q.shape == (2, 5, 4) and (q.amax(-1) == 255).all()
    torch.testing.assert_close(row_max, attn[:, :, 1:].amax(-1).float())
    with pytest.raises(ValueError, match=r"3600 patches x 6 heads is 74 MB.*use --image_size 424 or less"):
        check_size(6, 60 * 60, 8, 480)  # ViT-S/8 at 480 px
    check_size(6, 53 * 53, 8, 424)      # the size it names fits: 45 MB


def test_html_needs_one_image(explorer, tmp_path):
    from PIL import Image
    images = [str(tmp_path / name) for name in ("a.png", "b.png")]
    for path in images:
        Image.new("RGB", (32, 32)).save(path)
    with pytest.raises(SystemExit, match="^error: --html writes one page"):
        main(["--arch", "vit_ti16", "--image", *images, "--html", str(tmp_path / "x.html")])


# hover (r, c) with a real pointer event, then read the overlay canvas back at every patch centre
HOVER = """
<script>
function hover(r, c, headValue) {
  const stage = document.getElementById("stage"), overlay = document.getElementById("overlay");
  if (headValue !== undefined) {
    const select = document.getElementById("head");
    select.value = headValue; select.dispatchEvent(new Event("change"));
  }
  const b = overlay.getBoundingClientRect();
  stage.dispatchEvent(new PointerEvent("pointermove", {bubbles: true,
    clientX: b.left + (c + 0.5) * b.width / COLS, clientY: b.top + (r + 0.5) * b.height / ROWS}));
  const ctx = overlay.getContext("2d"), rgb = [];
  for (let i = 0; i < ROWS; i++) for (let j = 0; j < COLS; j++) {
    const d = ctx.getImageData(Math.floor((j + 0.5) * overlay.width / COLS),
                               Math.floor((i + 0.5) * overlay.height / ROWS), 1, 1).data;
    rgb.push([d[0], d[1], d[2], d[3]]);
  }
  return {rgb: rgb, query: +stage.dataset.query, head: +stage.dataset.head,
          info: document.getElementById("info").textContent};
}
const result = [hover(1, 2), hover(4, 6), hover(4, 6, 2), hover(0, 0, 0)];
const pre = document.createElement("pre");
pre.id = "result"; pre.textContent = JSON.stringify(result); document.body.append(pre);
</script>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install -y chromium (Debian), the "
                    "browser test of the HTML attention explorer needs a real browser")
def test_hovering_in_headless_chromium_draws_the_hovered_patchs_attention(explorer, tmp_path):
    page, attn, _ = explorer
    probe = tmp_path / "probe.html"
    script = HOVER.replace("COLS", str(COLS)).replace("ROWS", str(ROWS))
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    proc = run_command([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p'}",
                        "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()])
    found = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no result in the page: {proc.stdout[-500:]} {proc.stderr[-1500:]}"
    results = json.loads(html.unescape(found[1]))
    lut = {tuple(rgb): k for k, rgb in enumerate(colormap_lut().tolist())}
    drawn = []
    for res, (r, c, head) in zip(results, [(1, 2, -1), (4, 6, -1), (4, 6, 2), (0, 0, 0)]):
        assert res["query"] == 1 + r * COLS + c and res["head"] == head
        assert f"query patch ({r}, {c})" in res["info"]
        assert all(px[3] == 255 for px in res["rgb"])  # opaque colour-map pixels, the transparency is CSS
        indices = torch.tensor([lut[tuple(px[:3])] for px in res["rgb"]])       # every pixel is a colour-map colour
        expected = expected_indices(attn, 1 + r * COLS + c, head)
        tolerance = 1 if head >= 0 else 2  # one rounding per head; the mean adds up rounded rows
        assert (indices - expected).abs().max() <= tolerance, (r, c, head, indices.tolist(), expected.tolist())
        drawn.append(indices)
    assert (drawn[0] - drawn[1]).abs().max() > 20   # another patch, another map
    assert (drawn[1] - drawn[2]).abs().max() > 20   # the same patch, one head against the mean
