"""report.html and the pictures (sparsec.htmlreport): per-layer grouping on real transformer names,
mask pictures of blocked and unstructured masks, inspect --html / --format svg, the comparison of
two folders, older and partial folders, and the page rendered in headless Chromium.

Three compiles are shared by the whole module: a small BERT (2 layers, 16x16 blocks), the digits
example fine-pruned briefly, and the digits example at another density stopped after training.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsec.cli import main
from sparsec.htmlreport import masks as maskpics
from sparsec.htmlreport.layers import group_layers, place
from sparsec.htmlreport.page import SECTIONS

ROOT = Path(__file__).parent.parent
ZOO = ROOT / "tests" / "models" / "zoo"
DIGITS = ROOT / "examples" / "digits"
BERT_SPEC = """
[[prune]]
targets = ["bert.encoder.*"]
method = "movement"
density = 0.25
block = [16, 16]

[schedule]
kind = "cubic"
total = 8
warmup = 1
cooldown = 2

[train]
steps = 8
batch_size = 8
lr = 1e-3

[export]
policy = "always"
bench_repeats = 3
"""
SHORT = ["train.steps=60", "schedule.total=60", "schedule.warmup=5", "schedule.cooldown=10",
         "export.bench_repeats=3", "export.bench_batch=32"]


def compile_quietly(*args: object) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["compile", *map(str, args), "--no-progress"])
    assert code == 0, err.getvalue()


@pytest.fixture(scope="module")
def bert_out(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bert")
    spec = folder / "spec.toml"
    spec.write_text(BERT_SPEC)
    compile_quietly(ZOO / "bert.py", "--spec", spec, "-o", folder / "out")
    return folder / "out"


@pytest.fixture(scope="module")
def digits_outs(tmp_path_factory) -> tuple[Path, Path]:
    """The digits example (briefly), and again at density 0.3 stopped after training."""
    folder = tmp_path_factory.mktemp("digits")
    sets = [x for s in SHORT for x in ("--set", s)]
    compile_quietly(DIGITS / "model.py", "--spec", DIGITS / "spec.toml", "-o", folder / "p10", *sets)
    compile_quietly(DIGITS / "model.py", "--spec", DIGITS / "spec.toml", "-o", folder / "p30", *sets,
                    "--set", "prune[0].density=0.3", "--stop-after", "train")
    return folder / "p10", folder / "p30"


def sections(page: str) -> dict[str, str]:
    """Section id -> its HTML."""
    found = dict(re.findall(r"<section id='(\w+)' data-section='\w+'>(.*?)</section>", page, flags=re.S))
    assert list(found) == [key for key, _ in SECTIONS]
    return found


# ---------------------------------------------------------------------------------- grouping
def _two_dim_parameters(model: torch.nn.Module) -> list[dict]:
    return [{"site": name, "density": 0.5, "asked_density": 0.5}
            for name, p in model.named_parameters() if p.dim() == 2]


def test_grouping_of_bert_names():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=16))
    groups = group_layers([x for x in _two_dim_parameters(model) if x["site"].startswith("encoder.")])
    assert [g.block for g in groups] == ["encoder.layer.0", "encoder.layer.1"]
    for group in groups:
        assert [part for part, _ in group.layers] == ["attention Q", "attention K", "attention V",
                                                      "attention O", "FFN in", "FFN out"]
    assert [x["site"] for _, x in groups[1].layers][3:] == [
        "encoder.layer.1.attention.output.dense.weight", "encoder.layer.1.intermediate.dense.weight",
        "encoder.layer.1.output.dense.weight"]
    assert place("embeddings.word_embeddings.weight") == place("embeddings.word_embeddings.weight")
    assert not place("embeddings.word_embeddings.weight").transformer


def test_grouping_of_gpt2_names_with_blocks_in_numeric_order():
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(vocab_size=50, n_embd=32, n_layer=11, n_head=2, n_positions=16))
    groups = group_layers([x for x in _two_dim_parameters(model) if x["site"].startswith("h.")])
    assert [g.block for g in groups] == [f"h.{i}" for i in range(11)]   # h.10 after h.9
    assert [part for part, _ in groups[10].layers] == ["attention QKV", "attention O", "FFN in", "FFN out"]
    assert dict((x["site"], part) for part, x in groups[0].layers) == {
        "h.0.attn.c_attn.weight": "attention QKV", "h.0.attn.c_proj.weight": "attention O",
        "h.0.mlp.c_fc.weight": "FFN in", "h.0.mlp.c_proj.weight": "FFN out"}


@pytest.mark.parametrize("site, block, part", [
    ("distilbert.transformer.layer.3.attention.q_lin.weight", "distilbert.transformer.layer.3", "attention Q"),
    ("distilbert.transformer.layer.3.attention.out_lin.weight", "distilbert.transformer.layer.3", "attention O"),
    ("distilbert.transformer.layer.3.ffn.lin2.weight", "distilbert.transformer.layer.3", "FFN out"),
    ("model.layers.2.self_attn.v_proj.weight", "model.layers.2", "attention V"),
    ("model.layers.2.mlp.gate_proj.weight", "model.layers.2", "FFN gate"),
    ("model.layers.2.mlp.down_proj.weight", "model.layers.2", "FFN out"),
    ("encoder.block.1.layer.0.SelfAttention.k.weight", "encoder.block.1", "attention K"),
    ("decoder.block.0.layer.1.EncDecAttention.q.weight", "decoder.block.0", "cross-attention Q"),
    ("decoder.block.0.layer.2.DenseReluDense.wo.weight", "decoder.block.0", "FFN out"),
    ("vit.encoder.layer.0.attention.attention.query.weight", "vit.encoder.layer.0", "attention Q"),
    ("vit.encoder.layer.0.intermediate.dense.weight", "vit.encoder.layer.0", "FFN in"),
    ("encoder.layers.1.self_attn.in_proj_weight", "encoder.layers.1", "attention QKV"),
    ("encoder.layers.1.linear2.weight", "encoder.layers.1", "FFN out"),
    ("fc2.weight", "(top level)", "fc2"),                                 # by module path otherwise
    ("features.conv3.weight", "features", "conv3"),
])
def test_place_other_architectures(site, block, part):
    placed = place(site)
    assert (placed.block, placed.part) == (block, part)


# ----------------------------------------------------------------------------- mask pictures
def test_mask_picture_unstructured_is_the_mask():
    mask = (torch.rand(6, 10, generator=torch.Generator().manual_seed(0)) < 0.3).float().numpy()
    pic = maskpics.picture(mask, (1, 1))
    np.testing.assert_array_equal(pic.grid, mask)
    assert (pic.factor, pic.kept, pic.total) == (1, int(mask.sum()), 60)
    assert "1 cell = 1 weight" in pic.caption()
    image = _decode(maskpics.png(pic))
    assert image.shape[:2] == (6, 10)
    assert np.all((image[..., 0] < 0.5) == (mask == 1))   # kept = dark


def test_mask_picture_blocked_shows_one_cell_per_block():
    blocks = np.array([[1, 0, 0], [0, 1, 1]])
    mask = np.kron(blocks, np.ones((16, 8)))                 # 32x24 weights, 16x8 blocks
    pic = maskpics.picture(mask, [16, 8])
    np.testing.assert_array_equal(pic.grid, blocks)
    assert pic.kept == 3 * 16 * 8 and "16x8 block" in pic.caption()
    # a weight that the blocks do not divide: the edge block is partial, its cell still 0 or 1
    pic = maskpics.picture(np.ones((20, 8)), (16, 8))
    np.testing.assert_array_equal(pic.grid, [[1.0], [1.0]])


def test_mask_picture_downsamples_large_weights_keeping_the_density():
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(3000, 770, generator=g) < 0.1).numpy()
    pic = maskpics.picture(mask, (1, 1), max_cells=192)
    assert max(pic.grid.shape) <= 192 and pic.factor == 16
    # cells are means over the weights they cover (the last row and column of cells cover fewer):
    # weighted by those counts they give the number of weights kept
    rows = np.minimum(16, 3000 - 16 * np.arange(pic.grid.shape[0]))
    cols = np.minimum(16, 770 - 16 * np.arange(pic.grid.shape[1]))
    assert (pic.grid * np.outer(rows, cols)).sum() == pytest.approx(mask.sum())
    conv = np.zeros((8, 4, 3, 3))
    conv[:4] = 1
    pic = maskpics.picture(conv, (4, 36))
    np.testing.assert_array_equal(pic.grid, [[1.0], [0.0]])   # [O, I*kh*kw] in 4x36 blocks


def _decode(png: bytes) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png")


# ------------------------------------------------------------------------------ report.html
def test_compile_writes_a_self_contained_report(bert_out):
    page = (bert_out / "report.html").read_text()
    found = sections(page)
    assert "No data" not in page and "Not drawn" not in page, re.findall(r"No[^<]*", page)
    assert not re.search(r"""(src|href)=['"](https?:|//)""", page) and "<script" not in page
    assert page.count("<svg") >= 2                           # the curves and the per-layer bars
    ids = re.findall(r'\bid="([^"]+)"', page)
    referenced = set(re.findall(r'(?:url\(#|href="#)([^)"]+)', page))
    assert referenced and all(ids.count(name) == 1 for name in referenced)   # clip paths, markers: no collision
    report = json.loads((bert_out / "report.json").read_text())
    sites = [layer["site"] for layer in report["layers"]]
    assert len(sites) == 12 and found["masks"].count("<img") == 12
    assert all(site in found["layers"] and site in found["masks"] for site in sites)
    assert "attention Q" in found["layers"] and "FFN out" in found["layers"]
    assert "block-sparse" in found["lowering"] and "est. speedup" in found["lowering"]
    assert "model.onnx" in found["files"] and "vs dense" in found["lowering"]
    links = re.findall(r"href='(ir/[^']+)'", found["pipeline"])
    assert links and all((bert_out / link).is_file() for link in links)
    assert any("lower_block_sparse" in link for link in links)


def test_inspect_html_writes_elsewhere_with_links_back(bert_out, tmp_path, sparsec_cli):
    target = tmp_path / "elsewhere" / "r.html"
    code, out, err = sparsec_cli("inspect", bert_out, "--html", "-o", target)
    assert code == 0, err
    assert f"wrote {target}" in out
    links = re.findall(r"href='([^'#]+)'", target.read_text())
    assert links and all((target.parent / link).resolve().is_file() for link in links)
    code, _, err = sparsec_cli("inspect", bert_out, "--html", "-o", tmp_path)    # a folder
    assert code == 2 and "cannot be written" in err and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["elsewhere"]                # no temporary left


def test_inspect_svg_marks_masks_scores_and_sparse_ops(bert_out, sparsec_cli, monkeypatch):
    from sparsec.htmlreport import graph

    monkeypatch.setattr(graph.shutil, "which", lambda name: None)   # the plain layered layout
    code, out, err = sparsec_cli("inspect", bert_out, "--format", "svg")
    assert code == 0, err
    ET.fromstring(out)                                                  # well-formed SVG
    for label in graph.LEGEND.values():
        assert label in out
    record = json.loads((bert_out / "graph.json").read_text())
    lowered = {x["site"] for x in json.loads((bert_out / "report.json").read_text())["lowering"]["layers"] if x["lowered"]}
    from sparsec.inspection import to_networkx

    marked = graph.mark_sparse_ops(to_networkx(record), {"layers": [{"site": s, "lowered": True} for s in lowered]})
    assert sum(d.get("role") == "sparse_op" for _, d in marked.nodes(data=True)) == len(lowered) == 12
    positions = graph.positions_of(marked)
    rows = graph.layers_of(marked)
    assert all(rows[a] < rows[b] for a, b in marked.edges)              # every edge points down
    assert len(set(positions.values())) == len(positions)               # no two nodes overlap


def test_inspect_svg_with_graphviz_when_installed(digits_outs, sparsec_cli):
    if shutil.which("dot") is None:
        pytest.skip("graphviz's dot is not installed (apt-get install graphviz); the layered layout is tested above")
    code, out, err = sparsec_cli("inspect", digits_outs[0], "--format", "svg")
    assert code == 0, err
    text = "".join(ET.fromstring(out).itertext())   # graphviz writes '-' as &#45;
    lowering = json.loads((digits_outs[0] / "report.json").read_text())["lowering"]["layers"]
    lowered = sum(layer["lowered"] for layer in lowering)
    assert lowered >= 1 and "legend: lowered to a block-sparse op" in text
    assert text.count("[sparse_op]") == lowered


# ------------------------------------------------------------------------------- comparisons
def test_compare_two_folders_text_and_html(digits_outs, sparsec_cli, tmp_path):
    p10, p30 = digits_outs
    code, out, err = sparsec_cli("inspect", p10, p30)
    assert code == 0, err
    lines = out.splitlines()
    row10 = next(line for line in lines if line.startswith("p10 "))
    row30 = next(line for line in lines if line.startswith("p30 "))
    assert "0.100" in row10 and ("x kernel" in row10 or "x stock" in row10)
    assert "0.300" in row30 and "kernel" not in row30 and "stock" not in row30   # not lowered: no speedup
    per_site = out.split("per-site density:")[1]
    report = json.loads((p30 / "report.json").read_text())
    for layer in report["layers"]:
        assert f"{layer['density']:.3f}" in next(line for line in per_site.splitlines() if line.startswith(layer["site"]))
    target = tmp_path / "cmp.html"
    code, out, err = sparsec_cli("inspect", p10, p30, "--html", "-o", target)
    assert code == 0, err
    page = target.read_text()
    assert page.count("<svg") == 2 and "p10" in page and "p30" in page
    assert not re.search("No data|Not drawn", page)
    code, _, err = sparsec_cli("inspect", p10, p30, "--format", "svg")
    assert code == 2 and "several folders are compared" in err


def test_digits_reports_and_a_folder_stopped_before_lowering(digits_outs):
    p10, p30 = digits_outs
    assert not re.search("No data|Not drawn", (p10 / "report.html").read_text())
    found = sections((p30 / "report.html").read_text())
    assert "No data: compilation stopped after train" in found["lowering"]
    assert not re.search("No data|Not drawn", found["masks"] + found["curves"] + found["layers"])


def test_inspect_html_on_an_older_folder(digits_outs, tmp_path, sparsec_cli):
    """A folder as older versions wrote it: no train.jsonl, no masks in state, no lowering
    section, no report.html; then one whose report.json is unreadable."""
    old = tmp_path / "old"
    shutil.copytree(digits_outs[0], old)
    for name in ("train.jsonl", "report.html", "state.safetensors", "graph.json"):
        (old / name).unlink()
    report = json.loads((old / "report.json").read_text())
    del report["lowering"]
    (old / "report.json").write_text(json.dumps(report))
    code, out, err = sparsec_cli("inspect", old, "--html")
    assert code == 0, err
    found = sections((old / "report.html").read_text())
    assert "train.json<" in found["curves"]                              # the history from train.json
    assert "nonzero weights in model.safetensors" in found["masks"] and found["masks"].count("<img") == 3
    assert "No data: no lowering section" in found["lowering"]
    code, _, err = sparsec_cli("inspect", old, "--format", "svg")
    assert code == 2 and "no graph.json" in err

    (old / "report.json").write_text("{not json")
    code, out, err = sparsec_cli("inspect", old, "--html")
    assert code == 0, err
    found = sections((old / "report.html").read_text())
    for key in ("summary", "layers", "masks", "lowering"):
        assert "No data" in found[key] and "cannot be read as JSON" in found[key]
    assert "model.onnx" in found["files"] and "<li>" in found["pipeline"]
    code, _, err = sparsec_cli("inspect", tmp_path / "nothing", "--html")
    assert code == 2 and "no such output folder" in err


def test_lowering_table_shows_measured_per_layer_times_when_recorded(digits_outs, tmp_path):
    from sparsec.htmlreport.page import lowering
    from sparsec.htmlreport.run import Run

    folder = tmp_path / "measured"
    shutil.copytree(digits_outs[0], folder)
    assert "est. speedup" in lowering(Run.open(folder)) and "measured speedup" not in lowering(Run.open(folder))
    report = json.loads((folder / "report.json").read_text())
    report["lowering"]["layers"][0]["measured"] = {"dense_ms": 0.25, "sparse_ms": 0.05, "speedup": 5.0}
    (folder / "report.json").write_text(json.dumps(report))
    html = lowering(Run.open(folder))
    assert "measured speedup" in html and ">0.250<" in html and ">0.050<" in html and ">5.00<" in html


# ------------------------------------------------------------------------------- the browser
def _chromium() -> str:
    """The chromium binary; installed from Debian's registry when missing (root only), else skip."""
    import os
    import subprocess

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be (needs apt-get as root): apt-get install chromium")
    try:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=240, check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"chromium is not installed and `apt-get install -y chromium` failed: {type(exc).__name__}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed no chromium binary")
    return found


PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt);
  const sections = [...document.querySelectorAll('section')].map(s =>
    s.id + ':' + Math.round(s.getBoundingClientRect().height) + ':' + s.querySelectorAll('svg, img, table, ol').length);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({images: images.length, broken, sections});
  document.body.appendChild(out);
});
</script>"""


def test_report_renders_in_headless_chromium(bert_out, tmp_path):
    import subprocess

    chromium = _chromium()
    page = tmp_path / "report.html"   # a copy with a probe that reports what the browser drew
    page.write_text((bert_out / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--window-size=1280,4000", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
             "--v=0", "--virtual-time-budget=5000"]
    shot = tmp_path / "shot.png"
    done = subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, done.stderr[-2000:]
    image = _decode(shot.read_bytes())
    assert image.shape[0] == 4000 and image[..., :3].std() > 0.05       # not a blank page
    done = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    probe = re.search(r"<pre id=\"probe\">(.*?)</pre>", done.stdout, flags=re.S)
    assert probe, done.stderr[-2000:]
    result = json.loads(probe.group(1).replace("&quot;", '"'))
    assert result["images"] == 12 and result["broken"] == []
    heights = {s.split(":")[0]: (int(s.split(":")[1]), int(s.split(":")[2])) for s in result["sections"]}
    assert list(heights) == [key for key, _ in SECTIONS]
    assert all(height > 40 and drawn > 0 for height, drawn in heights.values()), heights
    errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert errors == []
