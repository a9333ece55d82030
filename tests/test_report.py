"""The generated report: every plot exists and decodes, the HTML is self-contained and complete,
labels stay legible with 20 members, an incomplete run fails with a clear error, and the page
renders in headless Chromium (skipped where Chromium is not installed)."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ensemble import report, store
from ensemble.metrics import softmax
from ensemble.report import ReportError, load_run, main, write_report

sys.path.insert(0, str(Path(__file__).parent))
from run_fixture import make_run  # noqa: E402

FIXED_PLOTS = ("comparison.png", "confusion.png", "reliability.png", "diversity.png",
               "ensemble_size.png")


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    """(run folder, index.html) of the default synthetic run, written once for this module
    through the command line entry point (whose printed path is checked here too)."""
    run = make_run(tmp_path_factory.mktemp("runs"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(run)]) == 0
    index = run / "report" / "index.html"
    assert out.getvalue() == f"{index}\n"
    return run, index


def _expected_pngs(run: Path) -> list:
    aliases = json.loads((run / "metrics.json").read_text())["member_names"]
    return list(FIXED_PLOTS) + [f"curves_{a}.png" for a in aliases]


def _data_uris(index: Path) -> dict:
    """alt text -> decoded PNG bytes of every <img> in the page."""
    page = index.read_text()
    pairs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return {alt: base64.b64decode(b64) for alt, b64 in pairs}


# ----------------------------------------------------------------------------- files and page

def test_every_png_exists_and_decodes(small_report):
    run, index = small_report
    for name in _expected_pngs(run):
        path = index.parent / name
        assert path.stat().st_size > 10_000, f"{name} is suspiciously small"
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width >= 600 and img.height >= 400, (name, img.size)
            colors = img.convert("L").getextrema()
            assert colors[1] - colors[0] > 100, f"{name} looks blank"


def test_html_is_self_contained_and_complete(small_report):
    run, index = small_report
    page = index.read_text()
    uris = _data_uris(index)
    assert sorted(uris) == sorted(_expected_pngs(run))
    for name, data in uris.items():
        assert data == (index.parent / name).read_bytes(), f"{name}: embedded bytes differ"
    assert page.count("<img") == len(uris)
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not load anything"
    assert "http://" not in page and "https://" not in page
    metrics = json.loads((run / "metrics.json").read_text())
    table = page[page.index("<table>"):page.index("</table>")]
    for name in list(metrics["members"]) + list(metrics["combiners"]):
        assert f"<td>{name}</td>" in table, f"{name} missing from the metrics table"
    assert "&lt;escaped &amp; shown&gt;" in page          # the recipe is escaped in <pre>
    assert "<pre>" in page and "synthetic_run" in page
    assert "200 training images (OOF rows), 4 classes: class_0, class_1, class_2, class_3;" in page
    assert "a combiner's by nested cross-validation" in page[:page.index("<table>")]  # what oof means, per kind
    captions = dict(re.findall(r"<figcaption><code>curves_(\w+)\.png</code>: ([^<]*)</figcaption>", page))
    assert "snapshot" in captions["snap_resnet18"] and "snapshot" not in captions["convnext_nano"], captions


# ----------------------------------------------------------------------------- numbers drawn

def test_oof_matrix_follows_the_layout(tmp_path):
    run = make_run(tmp_path, members="snapshots", snapshots=3)
    loaded = load_run(run)
    assert loaded.member_names[:3] == ["snap_resnet18@s1", "snap_resnet18@s2", "snap_resnet18@s3"]
    folds = np.load(run / "folds.npy")
    rows = np.flatnonzero(folds == 1)
    fold_file = np.load(run / "members" / "snap_resnet18" / "fold1" / "oof_logits.npy")
    np.testing.assert_array_equal(loaded.oof_logits[0, rows], fold_file[0])
    np.testing.assert_array_equal(loaded.oof_logits[2, rows], fold_file[-1])
    # the stored member metrics were computed from the same rows
    metrics = json.loads((run / "metrics.json").read_text())
    acc = (loaded.oof_logits.argmax(-1) == loaded.y).mean(axis=1)
    stored = [metrics["members"][n]["oof"]["accuracy"] for n in loaded.member_names]
    np.testing.assert_allclose(acc, stored)


def test_size_curve_and_disagreement_match_direct_computation():
    rng = np.random.default_rng(1)
    logits, y = rng.normal(size=(3, 50, 4)), rng.integers(0, 4, 50)
    order = [2, 0, 2]
    want = [(softmax(logits[order[:n]]).mean(0).argmax(-1) == y).mean() for n in (1, 2, 3)]
    np.testing.assert_allclose(report.size_curve(logits, y, order), want)
    d = report.disagreement(logits)
    assert d.shape == (3, 3) and np.all(np.diag(d) == 0) and np.allclose(d, d.T)
    assert d[0, 1] == (logits[0].argmax(-1) != logits[1].argmax(-1)).mean()


def _suptitle(fig) -> str:
    return fig.get_suptitle()


def test_fallbacks_are_drawn_and_said(tmp_path):
    run = make_run(tmp_path, with_test=False, with_reliability=False)
    (run / "combiners" / "weighted.json").unlink()
    loaded = load_run(run)
    assert loaded.order is None
    assert "OOF accuracy" in report.ensemble_size_figure(loaded).axes[0].get_title()
    assert "no greedy selection order" in report.ensemble_size_figure(loaded).axes[0].get_title()
    assert "OOF split" in report.confusion_figure(loaded.metrics).axes[0].get_title()
    rel = report.reliability_figure(loaded)
    assert "not drawn" in _suptitle(rel) and loaded.metrics["best"] in _suptitle(rel)
    labels = rel.axes[0].get_legend_handles_labels()[1]
    assert any(label.startswith("best member") for label in labels)


@pytest.mark.parametrize("state, order, size", [
    ({"order_": [1, 1, 0], "scores_": [0.5, 0.4, 0.45], "best_size_": 2}, [1, 1, 0], 2),
    ({"order": [2, 0]}, [2, 0], None),                    # the plain key also works
    ({"order_": [0, 7]}, None, None),                     # index out of range: ignored
    ({"order_": [0, 1], "best_size_": 5}, [0, 1], None),  # impossible prefix: not drawn
    ({}, None, None),                                     # e.g. method = "logloss"
])
def test_greedy_order_is_read_from_weighted_json(tmp_path, state, order, size):
    run = make_run(tmp_path)
    doc = {"format": 1, "class": "weighted", "params": {"method": "greedy"}, "state": state}
    (run / "combiners" / "weighted.json").write_text(json.dumps(doc))
    loaded = load_run(run)
    assert (loaded.order, loaded.best_size) == (order, size)
    title = report.ensemble_size_figure(loaded).axes[0].get_title()
    assert ("greedy-selection order" in title) == (order is not None)


def test_ensemble_size_title_says_when_the_run_has_no_weighted_combiner(tmp_path):
    run = make_run(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["combiners"]["weighted"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "combiners" / "weighted.json").unlink()
    title = report.ensemble_size_figure(load_run(run)).axes[0].get_title()
    assert "the run has no weighted combiner" in title and "weighted.json" not in title


def test_ensemble_size_percent_labels_are_distinct_on_a_narrow_range(small_report):
    fig = report.ensemble_size_figure(load_run(small_report[0]))
    ax = fig.axes[0]
    ax.set_ylim(0.9720, 0.9752)  # gridlines 0.05 points apart: one decimal would repeat labels
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if 0.9720 <= t.get_position()[1] <= 0.9752]
    assert len(labels) >= 4 and len(set(labels)) == len(labels), labels


def test_a_hard_votes_nll_does_not_flatten_the_nll_panel(tmp_path):
    run = make_run(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["combiners"]["vote"]["oof"]["nll"] = 9.5  # one-hot probabilities: a huge log-loss
    nlls = [s["oof"]["nll"] for kind in ("members", "combiners") for n, s in metrics[kind].items() if n != "vote"]
    nll_panel = report.comparison_figure(metrics).axes[2]
    assert max(nlls) < nll_panel.get_xlim()[1] < 9.5
    assert any(t.get_text().strip() == "9.500 (off scale)" for t in nll_panel.texts)


def test_the_metrics_table_lists_members_then_combiners_by_oof_accuracy(small_report):
    metrics = json.loads((small_report[0] / "metrics.json").read_text())
    names = re.findall(r"<tr(?: class=\"best\")?><td>([^<]+)</td><td>(member|combiner)</td><td>oof</td>",
                       report.metrics_table(metrics))
    assert len(names) == len(metrics["members"]) + len(metrics["combiners"])
    keys = [(kind != "member", -metrics[kind + "s"][name]["oof"]["accuracy"]) for name, kind in names]
    assert keys == sorted(keys)


def test_reliability_draws_best_member_combiner_and_ts_variants(small_report):
    run, _ = small_report
    loaded = load_run(run)
    labels = report.reliability_figure(loaded).axes[0].get_legend_handles_labels()[1]
    ts = [n for n in loaded.metrics["combiners"] if n.endswith("+ts")]
    assert ts and all(any(n in label for label in labels) for n in ts)
    assert any(label.startswith(f"best combiner: {loaded.metrics['best']}") for label in labels)


# ----------------------------------------------------------------------------- legibility

def _text_problems(fig) -> list:
    """Tick labels that overlap a neighbour, and texts that stick out of the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            problems += _overlapping(_tick_labels(axis), renderer, fig.dpi)
    box = fig.bbox.padded(1)
    for text in _labelling_texts(fig):
        ext = text.get_window_extent(renderer)
        if not (box.x0 <= ext.x0 and ext.x1 <= box.x1 and box.y0 <= ext.y0 and ext.y1 <= box.y1):
            problems.append(f"outside the figure: {text.get_text()[:40]!r}")
    return problems


def _labelling_texts(fig) -> list:
    """Suptitle, legends, titles, axis and tick labels (not the in-cell annotations)."""
    texts = [fig._suptitle] if fig._suptitle else []
    for legend in fig.legends:
        texts += legend.get_texts()
    for ax in fig.axes:
        texts += _axis_texts(ax)
        texts += ax.get_legend().get_texts() if ax.get_legend() else []
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _axis_texts(ax) -> list:
    return [ax.title, ax.xaxis.label, ax.yaxis.label, *_tick_labels(ax.xaxis), *_tick_labels(ax.yaxis)]


def _tick_labels(axis) -> list:
    """Visible, non-empty tick labels inside the axis' view interval (the ones actually drawn)."""
    lo, hi = sorted(axis.get_view_interval())
    at = 0 if axis.axis_name == "x" else 1
    pad = 1e-9 * max(hi - lo, 1)
    return [t for t in axis.get_ticklabels()
            if t.get_visible() and t.get_text() and lo - pad <= t.get_position()[at] <= hi + pad]


def _overlapping(labels: list, renderer, dpi: float) -> list:
    """Neighbouring tick labels whose ink overlaps; for slanted labels (e.g. 45 degrees) the gap
    between their parallel strips must exceed the text height."""
    out = []
    for a, b in zip(labels, labels[1:]):
        rot = a.get_rotation() % 180
        if rot in (0.0, 90.0):
            if a.get_window_extent(renderer).overlaps(b.get_window_extent(renderer)):
                out.append(f"overlap: {a.get_text()!r} / {b.get_text()!r}")
        else:
            pa, pb = (np.array(t.get_transform().transform(t.get_position())) for t in (a, b))
            gap = np.abs(pa - pb).max() * np.sin(np.radians(rot))
            if gap < a.get_fontsize() * dpi / 72:
                out.append(f"slanted overlap: {a.get_text()!r} / {b.get_text()!r}")
    return out


@pytest.fixture(scope="module")
def twenty(tmp_path_factory):
    return load_run(make_run(tmp_path_factory.mktemp("twenty"), n_members=20, n_classes=10,
                             n_rows=400, folds=3))


@pytest.mark.parametrize("build", ["comparison", "confusion", "reliability", "diversity",
                                   "ensemble_size", "curves"])
def test_twenty_members_labels_do_not_overlap(twenty, build):
    if build in ("comparison", "confusion"):
        fig = getattr(report, f"{build}_figure")(twenty.metrics)
    elif build == "curves":
        alias = "vit_tiny_patch16_224_v2"
        fig = report.curves_figure(alias, twenty.histories[alias], twenty.snapshot_epochs[alias])
    else:
        fig = getattr(report, f"{build}_figure")(twenty)
    assert _text_problems(fig) == []
    for ax in fig.axes:
        for t in ax.get_xticklabels() + ax.get_yticklabels():
            assert len(t.get_text()) <= report.MAX_LABEL + len("20: ") + 2, t.get_text()


def test_overlap_check_can_fail():
    fig = report._figure(3, 3)
    ax = fig.subplots()
    ax.set_xticks(range(20), labels=[f"a_rather_long_label_{i}" for i in range(20)])
    assert any(p.startswith("overlap") for p in _text_problems(fig))


def test_figures_grow_with_members(small_report, twenty):
    small = load_run(small_report[0])
    for build in (report.comparison_figure, ):
        assert build(twenty.metrics).get_figheight() > build(small.metrics).get_figheight() * 2
    heights = [report.diversity_figure(run).get_figheight() for run in (small, twenty)]
    assert heights[1] > heights[0]


def test_twenty_members_still_render(tmp_path):
    """20 members (19 snapshots of one backbone + 1 other) through the whole report, --out."""
    run = make_run(tmp_path, n_members=2, snapshots=19, members="snapshots", n_rows=300)
    assert len(load_run(run).member_names) == 20
    assert main([str(run), "--out", str(tmp_path / "out")]) == 0
    index = tmp_path / "out" / "index.html"
    assert sorted(_data_uris(index)) == sorted(
        list(FIXED_PLOTS) + ["curves_snap_resnet18.png", "curves_convnext_nano.png"])
    assert not (run / "report").exists()


# ----------------------------------------------------------------------------- errors and CLI

@pytest.mark.parametrize("missing", [
    "metrics.json", "labels.npy", "folds.npy", "recipe.toml",
    "members/convnext_nano/fold1/oof_logits.npy", "members/snap_resnet18/fold2/history.json",
])
def test_missing_file_is_named(tmp_path, missing):
    run = make_run(tmp_path)
    (run / missing).unlink()
    with pytest.raises(ReportError, match=re.escape(missing)) as info:
        write_report(run)
    if missing != "recipe.toml":  # no run
        assert f"python -m ensemble.fit {run / 'recipe.toml'} --out {run}" in str(info.value)
    if missing.startswith("members/"):  # a finished job lost a file: only retraining it brings the file back
        assert f"delete {(run / missing).parent} and run" in str(info.value)
        assert "complete the run" not in str(info.value)


def _edit_metrics(run: Path, edit) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    edit(metrics)
    (run / "metrics.json").write_text(json.dumps(metrics))


@pytest.mark.parametrize("damage, message", [
    (lambda run: np.save(run / "members/convnext_nano/fold0/oof_logits.npy", np.zeros((1, 5, 4))),
     r"fold0/oof_logits.npy: shape \(1, 5, 4\), expected \(1, \d+, 4\)"),
    (lambda run: np.save(run / "members/convnext_nano/fold0/oof_logits.npy", np.float32(1)),
     r"fold0/oof_logits.npy: shape \(\), expected 3 dimensions"),
    (lambda run: (run / "metrics.json").write_text("{}"), "no 'member_names' key"),
    (lambda run: (run / "metrics.json").write_text("{not json"),
     r"metrics.json is not valid JSON \(.*\); rewrite it with `python -m ensemble.fit .*` \(cached jobs are reused\)$"),
    # a missing file is not "not valid JSON" (a ReportError is a ValueError, and was caught as one)
    (lambda run: (run / "metrics.json").unlink(), r"metrics.json is missing: the run is incomplete; finish it with "
                                                   r"`python -m ensemble.fit [^`]*` \(cached jobs are reused\), then retry$"),
    (lambda run: np.save(run / "folds.npy", np.zeros(3, dtype=np.int64)),
     r"must be \(N,\) of equal length"),
    (lambda run: shutil.rmtree(run), "does not exist"),
    (lambda run: (run / "labels.npy").write_bytes((run / "labels.npy").read_bytes()[:100]),
     r"labels.npy: not a readable numpy array .*; rewrite it with `python -m ensemble.fit"),
    (lambda run: (run / "recipe.toml").unlink(), "not a run folder"),
    (lambda run: (run / "metrics.json").write_bytes(b'{"classes": "caf\xe9"}'), "metrics.json is not valid JSON"),
    (lambda run: (run / "members/convnext_nano/fold0/history.json").write_text("[]"),
     r"fold0/history.json holds no history object; delete .* and run"),
    (lambda run: (run / "recipe.toml").write_bytes((run / "recipe.toml").read_bytes() + b"# caf\xe9\n"),
     "recipe.toml is not UTF-8 text"),
    (lambda run: (run / "metrics.json").write_text("3"), "metrics.json holds no metrics object"),
    (lambda run: _edit_metrics(run, lambda m: m["combiners"].update(vote={})),
     "metrics.json: combiners entry 'vote' is not an object with 'oof' scores"),
    (lambda run: _edit_metrics(run, lambda m: m.update(classes="abcd")), "'classes' is not a list of names"),
])
def test_inconsistent_run_is_explained(tmp_path, damage, message):
    run = make_run(tmp_path)
    damage(run)
    with pytest.raises(ReportError, match=message):
        load_run(run)


def test_test_logits_of_another_shape_are_explained_not_a_numpy_error(tmp_path):
    run = make_run(tmp_path)
    np.save(run / "members/convnext_nano/fold1/test_logits.npy", np.zeros((1, 2, 4), dtype=np.float32))
    with pytest.raises(store.RunError, match=r"fold1/test_logits.npy: shape \(1, 2, 4\), expected \(1, \d+, 4\) "
                                             r"\(snapshots, test images, classes\); delete that job folder"):
        store.load_logits(run, ["convnext_nano"])


def test_main_refuses_a_file_as_out(tmp_path, capsys):
    (tmp_path / "p.csv").write_text("x")
    assert main([str(make_run(tmp_path)), "--out", str(tmp_path / "p.csv")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["file/sub", "/proc/rep", None])
def test_main_says_on_one_line_why_the_report_cannot_be_written(tmp_path, capsys, out):
    run = make_run(tmp_path)
    (tmp_path / "file").write_text("x")
    if out is None:  # the default RUN/report is a file
        (run / "report").write_text("x")
    target = run / "report" if out is None else tmp_path / out
    assert main([str(run)] + ([] if out is None else ["--out", str(target)])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write the report to {target}: ") and err.count("\n") == 1, err


def test_out_must_be_empty_or_a_previous_report(tmp_path, capsys):
    run = make_run(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html>someone's page</html>")
    assert main([str(run), "--out", str(site)]) == 2
    assert "holds other files and no previous report" in capsys.readouterr().err
    assert (site / "index.html").read_text() == "<html>someone's page</html>"
    (site / "index.html").unlink()
    assert main([str(run), "--out", str(site)]) == 0  # empty: fine
    (site / "curves_renamed_alias.png").write_bytes((site / "comparison.png").read_bytes())
    (site / "notes.txt").write_text("kept")
    assert main([str(run), "--out", str(site)]) == 0  # its own previous report: rewritten
    assert not (site / "curves_renamed_alias.png").exists() and (site / "notes.txt").exists()


def test_main_refuses_an_out_inside_the_run_or_its_images(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main([str(run), "--out", str(run / "members")]) == 2
    assert "is inside the run folder" in capsys.readouterr().err
    images = tmp_path / "images"
    text = (run / "recipe.toml").read_text()
    (run / "recipe.toml").write_text(text.replace('source = "synthetic"', f"source = 'folder'\npath = '{images}'"))
    assert main([str(run), "--out", str(images / "cat")]) == 2
    assert "is inside data.path" in capsys.readouterr().err and not images.exists()
    assert main([str(run), "--out", str(run / "report")]) == 0  # its own place


def test_main_reports_a_missing_file_on_one_line(tmp_path, capsys):
    run = make_run(tmp_path)
    (run / "members" / "convnext_nano" / "fold0" / "oof_logits.npy").unlink()
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "oof_logits.npy" in err and err.startswith("error: ")


# ----------------------------------------------------------------------------- audit findings

def test_the_longest_alias_gets_a_file_name_and_a_short_title():
    a = "x" * 100  # the longest a recipe takes
    assert len(f".curves_{report._file_safe(a)}.png.abcdefgh.tmp".encode()) < 255  # atomic_write's temp file
    assert report._file_safe("snap_resnet18@s1") == "snap_resnet18@s1"
    hist = [[{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "train_acc": 0.5, "val_acc": 0.5}]]
    assert len(report.curves_figure(a, hist, []).get_suptitle()) < 150


def test_a_run_folder_whose_path_is_not_utf8(tmp_path):
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9run"))
    make_run(tmp_path).rename(odd)
    assert main([str(odd), "--out", str(tmp_path / "out")]) == 0
    assert "caf\ufffdrun" in (tmp_path / "out" / "index.html").read_text()


def test_reliability_draws_calibrated_snapshot_combiners(tmp_path):
    run = make_run(tmp_path)
    _edit_metrics(run, lambda m: m["combiners"].update({"snapshot+ts:snap_resnet18": m["combiners"]["mean+ts"]}))
    labels = report.reliability_figure(load_run(run)).axes[0].get_legend_handles_labels()[1]
    assert any(label.startswith("calibrated: snapshot+ts:snap_resnet18") for label in labels), labels


def _rename_member(metrics: dict, old: str, new: str) -> None:
    metrics["member_names"] = [new if n == old else n for n in metrics["member_names"]]
    metrics["members"][new] = metrics["members"].pop(old)


def test_a_member_named_like_a_combiner_is_treated_as_a_member(small_report):
    metrics = json.loads((small_report[0] / "metrics.json").read_text())
    _rename_member(metrics, "convnext_nano", metrics["best"])
    best = re.findall(r'<tr class="best"><td>[^<]+</td><td>(\w+)</td>', report.metrics_table(metrics))
    assert best and set(best) == {"combiner"}
    _rename_member(metrics, metrics["member_names"][0], "voter")
    metrics["members"]["voter"]["oof"]["nll"] = 9.5   # a member's NLL counts for the scale
    assert report.comparison_figure(metrics).axes[2].get_xlim()[1] > 9.5


@pytest.mark.parametrize("n_epochs", [1, 2])
def test_short_learning_curves_have_markers_and_whole_epoch_ticks(n_epochs):
    hist = [[{"epoch": e, "train_loss": 1.0 / e + k, "val_loss": 1.2 / e, "train_acc": 0.5, "val_acc": 0.4}
             for e in range(1, n_epochs + 1)] for k in range(3)]
    fig = report.curves_figure("a", hist, [])
    fig.canvas.draw()
    for ax in fig.axes:
        drawn = [line for line in ax.lines if len(line.get_xdata())]
        assert drawn and all(line.get_marker() not in (None, "None", "") for line in drawn)
        lo, hi = ax.get_xlim()
        assert [t for t in ax.get_xticks() if lo <= t <= hi] == list(range(1, n_epochs + 1))


def test_shortened_labels_keep_where_names_differ(tmp_path):
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven")
    names = [f"scanned_digit_{w}_from_archive" for w in words]
    labels = report._shorts(names, 16)
    assert all(w in label and len(label) <= 16 for w, label in zip(words, labels)), labels
    few = report._shorts(names[:3], 16)                  # few labels may be longer
    assert len(set(few)) == 3 and 16 < max(map(len, few)) <= 24, few
    clash = ["0" + "x" * 30 + "a" + "x" * 30 + "0", "0" + "x" * 30 + "b" + "x" * 30 + "0", "1" + "x" * 61 + "1"]
    key = {}
    labels = report._shorts(clash, 16, key)
    assert labels[0].endswith("#1") and labels[1].endswith("#2") and "#" not in labels[2]
    assert key == {labels[0]: clash[0], labels[1]: clash[1]}
    run = make_run(tmp_path, n_classes=3)
    _edit_metrics(run, lambda m: m.update(classes=clash))
    page = write_report(run).read_text()
    assert f"<code>{labels[0]}</code> → {clash[0]}" in page


def test_a_class_without_images_in_the_split_is_a_grey_row(tmp_path):
    run = make_run(tmp_path)
    _edit_metrics(run, lambda m: m["combiners"][m["best"]]["test"]["confusion"].__setitem__(0, [0, 0, 0, 0]))
    loaded = load_run(run)
    texts = [t.get_text() for t in report.confusion_figure(loaded.metrics).axes[0].texts]
    assert texts.count("no images") == 1 and len(texts) == 1 + 3 * 4
    assert "no images" in report._caption(loaded, "confusion.png")
    assert "no images" not in report._caption(load_run(make_run(tmp_path / "b")), "confusion.png")


def test_missing_glyphs_are_one_note_not_a_warning_each(tmp_path, capsys):
    run = make_run(tmp_path)
    # CJK, which some machines' fonts draw, and private-use characters, which no font draws
    _edit_metrics(run, lambda m: m.update(classes=["日本語", "中文", "\ue000\ue001", "漢字"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_report(run)
    assert not [w for w in caught if "Glyph" in str(w.message)]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: the installed fonts cannot draw "), err
    assert "\ue000 \ue001" in err and err.endswith("; the plots show them as boxes\n")


def test_the_page_gives_the_choice_of_the_best_scored_nested_where_fit_recorded_it(tmp_path):
    run = make_run(tmp_path)
    assert "picking the best this way" not in write_report(run).read_text()  # a run from before it was recorded
    _edit_metrics(run, lambda m: m.update(choice_accuracy=0.81234))
    assert "picking the best this way, scored on folds it was not picked on: 0.8123 OOF accuracy" \
        in write_report(run).read_text()


def test_wording_follows_the_run(tmp_path):
    run = make_run(tmp_path / "a", with_test=False)
    page = write_report(run).read_text()
    assert "Split <code>test</code>" not in page and "no test set" in page
    text = (run / "recipe.toml").read_text()
    text = text.replace("[train]\n", "[train]\naugment = []\n")   # [train]'s, and one backbone's own
    text = text.replace('alias = "convnext_nano"', 'alias = "convnext_nano"\naugment = ["flip"]')
    (run / "recipe.toml").write_text(text)
    loaded = load_run(run)
    assert not report._augmented(loaded, "snap_resnet18") and report._augmented(loaded, "convnext_nano")
    assert "augmented" not in report._caption(loaded, "curves_snap_resnet18.png")
    fig = report.curves_figure("snap_resnet18", loaded.histories["snap_resnet18"], [], augmented=False)
    assert not any("augmented" in t.get_text() for t in fig.legends[0].get_texts())
    # one member: no lone grey disagreement cell, a sentence instead
    one = make_run(tmp_path / "b", n_members=1)
    page = write_report(one).read_text()
    assert not (one / "report" / "diversity.png").exists() and "only one member" in page
    # the confusion hint names the command that rewrites this run
    _edit_metrics(one, lambda m: [s.pop("confusion") for s in m["combiners"][m["best"]].values()])
    with pytest.raises(ReportError, match=re.escape(f"--out {one}")):
        write_report(one)


def test_comparison_breaks_accuracy_ties_by_nll_like_fit(small_report):
    metrics = json.loads((small_report[0] / "metrics.json").read_text())
    first, second = list(metrics["combiners"])[:2]
    for name, nll in ((first, 0.9), (second, 0.1)):
        metrics["combiners"][name]["oof"].update(accuracy=1.0, nll=nll)
    metrics["best"] = second                    # as fit picks it: OOF accuracy, then OOF NLL
    top = report.comparison_figure(metrics).axes[0].get_yticklabels()[0].get_text()
    assert top == second


# ----------------------------------------------------------------------------- headless browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK_SCRIPT = """<script>window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const d = document.createElement("div");
  d.id = "img-check"; d.dataset.total = imgs.length; d.dataset.loaded = ok;
  document.body.appendChild(d);
});</script></body>"""


def _chromium(tmp_path: Path, page: Path, *args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", *args,
           page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _loaded_images(tmp_path: Path, page_text: str) -> tuple[int, int]:
    page = tmp_path / "check.html"
    page.write_text(page_text.replace("</body>", CHECK_SCRIPT))
    dom = _chromium(tmp_path, page, "--dump-dom")
    found = re.search(r'id="img-check" data-total="(\d+)" data-loaded="(\d+)"', dom)
    assert found, f"the check script did not run; DOM tail: {dom[-500:]!r}"
    return int(found.group(1)), int(found.group(2))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(apt-get install -y chromium) - headless rendering check skipped")
def test_page_renders_in_headless_chromium(small_report, tmp_path):
    run, index = small_report
    page_text = index.read_text()
    total, loaded = _loaded_images(tmp_path, page_text)
    assert total == len(_expected_pngs(run)) and loaded == total
    # the check can fail: a corrupted data URI does not load
    broken = page_text.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1)
    assert _loaded_images(tmp_path, broken) == (total, total - 1)
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, index, f"--screenshot={shot}", "--window-size=1280,2000")
    with Image.open(shot) as img:
        img.verify()
    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        assert img.convert("L").getextrema()[0] < 100, "the screenshot is blank"


def test_class_names_with_dollar_signs_are_drawn_as_text_not_tex(tmp_path):
    """Matplotlib parses a label with two '$' as mathtext: 'coin_$1_$2' crashed the report (and fit)."""
    run = make_run(tmp_path)
    _edit_metrics(run, lambda m: m.update(classes=["coin_$1_$2", "price_$^$", "$x$", "cat"]))
    write_report(run)
    labels = [t.get_text() for t in report.confusion_figure(load_run(run).metrics).axes[0].get_yticklabels()]
    assert "coin_$1_$2" in labels and "$x$" in labels


def test_the_html_table_and_best_member_break_accuracy_ties_by_nll_as_fit_does(tmp_path):
    run = make_run(tmp_path)

    def tie(m):
        combos, members = m["combiners"], m["members"]
        combos["mean+ts"]["oof"].update(accuracy=combos["mean"]["oof"]["accuracy"], nll=0.01)
        first, second = m["member_names"][:2]
        members[first]["oof"].update(accuracy=0.99, nll=0.5)
        members[second]["oof"].update(accuracy=0.99, nll=0.4)
    _edit_metrics(run, tie)
    metrics = load_run(run).metrics
    rows = re.findall(r"<tr(?: class=\"best\")?><td>([^<]+)</td><td>combiner</td><td>oof</td>",
                      report.metrics_table(metrics))
    assert rows.index("mean+ts") < rows.index("mean")
    assert report._best_member(metrics) == metrics["member_names"][1]


def test_the_label_key_is_in_a_fixed_order_whatever_the_hash_seed():
    names = ["a" + "x" * 30 + k + "x" * 30 + "a" for k in "pq"] + ["b" + "x" * 30 + k + "x" * 30 + "b" for k in "pq"]
    code = ("import sys; sys.path.insert(0, '.'); from ensemble import report; key = {}; "
            f"report._shorts({names!r}, 16, key); print(list(key))")
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(out) == 1


def test_ctrl_c_during_the_report_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "_draw", interrupted)
    assert main([str(make_run(tmp_path)), "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "interrupted: the report is incomplete; run the same command again\n"


def test_long_snapshot_combiner_names_stay_inside_the_figures(tmp_path):
    run = make_run(tmp_path)
    long = "snapshot+ts:" + "s" * 100

    def rename(m):
        m["combiners"][long] = m["combiners"].pop("mean+ts")
        m["best"] = long
    _edit_metrics(run, rename)
    loaded = load_run(run)
    for fig in (report.reliability_figure(loaded), report.confusion_figure(loaded.metrics),
                report.ensemble_size_figure(loaded)):
        assert _text_problems(fig) == []
