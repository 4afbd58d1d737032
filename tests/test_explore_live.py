"""The notebook Explorer in a live JupyterLab, driven with a mouse in headless Chromium.

tests/test_explore.py drives the Explorer's handlers from Python; this checks the whole loop a
person sees: the FigureWidget's hover / lasso events reach the kernel, and the thumbnails,
metadata and colours it sends back show up in the page.
"""

import secrets
import socket
import subprocess
import sys
import time
import urllib.request

import nbformat
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmc_kit import CLASS_NAMES, PALETTE, embed

N = 12
SIZE = 32

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def sample_colour(index):
    return np.array([(37 * index + 20) % 256, (91 * index + 60) % 256, (53 * index + 140) % 256])


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a free port over a folder with a dataset and an explorer notebook."""
    pytest.importorskip("jupyterlab")
    ramp = np.tile(np.linspace(1000, 60000, SIZE).astype(np.uint16), (SIZE, 1))
    rows = []
    for i in range(N):
        sample_id = f"{i + 1:04d}"
        paths = {kind: tmp_path / f"{sample_id}_{suffix}.png"
                 for kind, suffix in (("terrain", "t"), ("height", "h"), ("segmentation", "i2"))}
        Image.fromarray(np.full((SIZE, SIZE, 3), sample_colour(i), np.uint8)).save(paths["terrain"])
        Image.fromarray(ramp).save(paths["height"])
        Image.fromarray(np.full((SIZE, SIZE, 3), PALETTE[i % 7], np.uint8)).save(
            paths["segmentation"])
        rows.append({"id": sample_id, **{k: str(v) for k, v in paths.items()}})
    pd.DataFrame(rows).to_csv(tmp_path / "catalog.csv", index=False)
    rng = np.random.default_rng(0)
    table = embed.embeddings_frame([r["id"] for r in rows], rng.normal(size=(N, 6)))
    fractions = np.eye(7)[np.arange(N) % 7]
    for k, column in enumerate(embed.FRACTION_COLUMNS):
        table[column] = fractions[:, k]
    table["dominant_class_id"] = np.arange(N) % 7
    table["dominant_class"] = [CLASS_NAMES[i % 7] for i in range(N)]
    table["height_mean"] = np.arange(N) * 100.0
    table["height_std"] = 1.0
    embed.save_table(table, tmp_path / "table.parquet")
    # Spread out so the lasso around one point catches no other.
    np.save(tmp_path / "layout.npy", np.stack([np.arange(N) % 4, np.arange(N) // 4], 1) * 10.0)
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell(
        "import numpy as np, pandas as pd\n"
        "from cmc_kit import embed, explore\n"
        "catalog = pd.read_csv('catalog.csv', dtype={'id': str})\n"
        "explorer = explore.Explorer(embed.load_table('table.parquet'), catalog,\n"
        "                            layout=np.load('layout.npy'))\n"
        "explorer")]
    nbformat.write(notebook, tmp_path / "explorer.ipynb")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_hex(16)
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--allow-root",
         "--LabApp.news_url=", "--LabServerApp.check_for_updates_class="
         "jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}",
                                       timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "jupyterlab.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "JupyterLab did not start in 90 s"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/lab/tree/explorer.ipynb?token={token}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


PLOT = "document.querySelector('.jp-OutputArea .js-plotly-plot')"

# The page position of point `i` of the scatter.
POINT_XY = """i => {
    const gd = %s, layout = gd._fullLayout, box = gd.getBoundingClientRect();
    const point = gd.calcdata[0][i];
    return [box.left + layout._size.l + layout.xaxis.d2p(point.x),
            box.top + layout._size.t + layout.yaxis.d2p(point.y)]; }""" % PLOT

# The colour at the centre of an <img>, read back through a canvas.
CENTRE_RGB = """image => {
    const canvas = document.createElement('canvas');
    canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
    const context = canvas.getContext('2d');
    context.drawImage(image, 0, 0);
    return Array.from(context.getImageData(canvas.width >> 1, canvas.height >> 1, 1, 1).data)
        .slice(0, 3); }"""


def test_hover_lasso_and_colour_by_in_jupyterlab(lab, browser, tmp_path):
    errors = []
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(lab)
        page.wait_for_selector(".jp-Notebook", timeout=90_000)
        # The kernel is up when the status bar says so; Run All before that is lost.
        page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=90_000)
        page.get_by_role("menuitem", name="Run").first.click()
        page.get_by_text("Run All Cells", exact=True).click()
        page.wait_for_function(f"{PLOT} && {PLOT}.calcdata", timeout=180_000)
        output = page.locator(".jp-OutputArea-output", has=page.locator(".js-plotly-plot"))

        # Hover: the kernel's thumbnails and metadata of that sample appear.
        page.mouse.move(*page.evaluate(POINT_XY, 7))
        output.get_by_text("0008", exact=True).first.wait_for(timeout=30_000)
        images = output.locator("img")
        page.wait_for_function(
            "n => document.querySelectorAll('.jp-OutputArea-output img').length >= n", arg=3)
        terrain, segmentation = images.nth(0), images.nth(2)
        page.wait_for_function("image => image.complete && image.naturalWidth > 0",
                               arg=terrain.element_handle())
        np.testing.assert_allclose(terrain.evaluate(CENTRE_RGB), sample_colour(7), atol=12)
        assert segmentation.evaluate(CENTRE_RGB) == list(PALETTE[7 % 7])
        assert "water" in output.inner_text() and "700" in output.inner_text()

        # Lasso around point 5 only: its terrain thumbnail fills the grid.
        x, y = page.evaluate(POINT_XY, 5)
        page.mouse.move(x - 20, y - 20)
        page.mouse.down()
        for dx, dy in ((20, -20), (20, 20), (-20, 20), (-20, -20)):
            page.mouse.move(x + dx, y + dy, steps=5)
        page.mouse.up()
        output.get_by_text("1 selected").wait_for(timeout=30_000)
        page.wait_for_function(
            "n => document.querySelectorAll('.jp-OutputArea-output img').length === n", arg=4)
        grid_image = images.nth(3)
        page.wait_for_function("image => image.complete && image.naturalWidth > 0",
                               arg=grid_image.element_handle())
        np.testing.assert_allclose(grid_image.evaluate(CENTRE_RGB), sample_colour(5),
                                   atol=12)

        # Colour by another column: the kernel recolours the plot in the page.
        output.locator("select").first.select_option("height_mean")
        page.wait_for_function(f"{PLOT}._fullData[0].marker.showscale === true",
                               timeout=30_000)
        colours = page.evaluate(f"Array.from({PLOT}._fullData[0].marker.color)")
        np.testing.assert_allclose(colours, np.arange(N) * 100.0)
        page.screenshot(path=str(tmp_path / "jupyterlab.png"))  # kept in pytest's tmp folder
    except Exception:
        page.screenshot(path=str(tmp_path / "failed.png"))
        raise
    assert errors == []
