"""`qkvlab report`: kind detection, the self-contained HTML page and its Markdown twin, the figure check,
and the page in a real headless browser (Debian's chromium, driven by selenium)."""

from __future__ import annotations

import html as htmllib
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from qkvlab.cli import main
from qkvlab.errors import UserError
from qkvlab.report.build import detect
from qkvlab.report.figures import figure_problems, pyplot
from qkvlab.repro.registry import experiments

from conftest import tiny_gpt_settings

REPO = Path(__file__).resolve().parents[1]
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 60


def _train(tmp_path: Path, name: str, attn_wd: str) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / name
    settings = tiny_gpt_settings(corpus, out)
    preset = ["--preset", f"decoupled-attn:attn_weight_decay={attn_wd}"]
    assert main(["train", *[f"{k}={v}" for k, v in settings.items()], *preset]) == 0
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("report")
    runs = [_train(tmp, "run-a", "0"), _train(tmp, "run-b", "1")]
    inspect_json = tmp / "inspect.json"
    assert main(["inspect", str(runs[0]), "--json", str(inspect_json), "--quiet"]) == 0
    theory_json = tmp / "theory.json"
    args = ["theory", "--lambdas", "0,0.3", "--steps", "400", "--seeds", "0", "--parts", "toy"]
    assert main([*args, "--json", str(theory_json), "--quiet"]) == 0
    return {"run-a": runs[0], "run-b": runs[1], "inspect": inspect_json, "theory": theory_json, "tmp": tmp}


class _Structure(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.h2: list[str] = []
        self.images: list[dict[str, str]] = []
        self.external: list[str] = []
        self.tags: set[str] = set()
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        attrs = dict(attrs)
        self.tags.add(tag)
        self._in_h2 = tag == "h2"
        if tag == "h2":
            self.h2.append("")
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)

    def handle_endtag(self, tag):  # type: ignore[no-untyped-def]
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):  # type: ignore[no-untyped-def]
        if self._in_h2:
            self.h2[-1] += data


def _report(paths: list[Path], out: Path, capsys) -> tuple[Path, Path]:
    assert main(["report", *map(str, paths), "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    html = Path(last)
    assert html == out / "report.html" and html.is_file()
    return html, out / "report.md"


def _sections(html: Path, md: Path) -> tuple[_Structure, list[str]]:
    parser = _Structure()
    parser.feed(html.read_text())
    # Markdown headings as a reader sees them: backslash escapes and entities resolved
    headings = [
        htmllib.unescape(re.sub(r"\\(.)", r"\1", h))
        for h in re.findall(r"^## (.+)$", md.read_text(), flags=re.M)
    ]
    assert [h.strip() for h in parser.h2] == headings  # the twins carry the same sections, in order
    return parser, headings


def test_detects_every_kind_from_its_own_files(outputs, tmp_path) -> None:
    claims = experiments()
    assert detect(outputs["run-a"]) == "training-run"
    assert detect(outputs["inspect"]) == "inspect"
    assert detect(outputs["theory"], claims) == "repro:theory"
    # the report itself knows no claim: without the registry a theory file is one line naming the kinds
    with pytest.raises(UserError, match=r"cannot tell what .* is; accepted: "):
        detect(outputs["theory"])
    legacy = tmp_path / "old.json"  # an inspect --json file from before files carried a kind
    data = json.loads(outputs["inspect"].read_text())
    del data["kind"]
    legacy.write_text(json.dumps(data))
    assert detect(legacy) == "inspect"
    final = json.loads((outputs["run-a"] / "final.json").read_text())
    assert final["kind"] == "training-run" and final["schema_version"] == 1
    assert final["command"].startswith("qkvlab train data=text:")
    # every kind of output names itself
    assert json.loads(outputs["inspect"].read_text())["kind"] == "inspect"
    assert json.loads(outputs["theory"].read_text())["kind"] == "theory"
    # committed results that predate the kind field
    assert detect(REPO / "results/paper000-icl-linear", claims) == "repro:wd-rank"
    assert detect(REPO / "results/repro-finetune", claims) == "repro:finetune"
    assert detect(REPO / "results/theory/theory.json", claims) == "repro:theory"
    assert detect(REPO / "results/paper000-gpt/runs/attn=0,rest=0.1,seed=0") == "training-run"


def test_two_runs_overlay_and_the_page_is_self_contained(outputs, tmp_path, capsys) -> None:
    assert os.environ["QKVLAB_CHECK_FIGURES"] == "1"  # so every figure below passed figure_problems
    html, md = _report([outputs["run-a"], outputs["run-b"]], tmp_path / "r", capsys)
    parser, headings = _sections(html, md)
    assert headings.count("Training curves") == 1  # two runs, one set of shared axes
    assert "Attention rank over training" in headings
    assert any(h.startswith("Last monitor record: run-a") for h in headings)
    assert "Commands and settings" in headings
    assert parser.external == [] and "script" not in parser.tags and "link" not in parser.tags
    assert parser.images and all(img["src"].startswith("data:image/png;base64,") for img in parser.images)
    text = md.read_text()
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (md.parent / target).is_file(), target
    assert "qkvlab train data=text:" in text and "run-b" in text


def test_inspect_theory_and_repro_sections(outputs, tmp_path, capsys) -> None:
    html, md = _report([outputs["inspect"], outputs["theory"]], tmp_path / "r", capsys)
    _, headings = _sections(html, md)
    assert headings[0] == "Spectra: inspect" and "Theory: theory" in headings
    assert "Theory: command and settings" in headings and "qkvlab theory --lambdas 0,0.3" in md.read_text()
    html, md = _report([REPO / "results/paper000-icl-linear"], tmp_path / "icl", capsys)
    _, headings = _sections(html, md)
    assert headings[0].startswith("Weight decay and attention rank (paper000-icl-linear")
    assert "qkvlab repro wd-rank --out" in md.read_text() and "| Σηλ" in md.read_text()


def test_user_mistakes_are_one_line(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "thing.json").write_text('{"a": 1}')
    assert main(["report", str(tmp_path / "thing.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot tell what" in err and "accepted:" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "broken.json").write_text("{")
    assert main(["report", str(tmp_path / "broken.json")]) == 2


def test_figure_check_names_what_a_reader_would_miss() -> None:
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot(range(5), range(5))
    ax.plot(range(5), range(1, 6))
    ax.imshow([[0, 1], [1, 0]])
    problems = figure_problems(fig)
    assert any("no title" in p for p in problems) and any("x axis not labelled" in p for p in problems)
    assert any("no legend" in p for p in problems) and any("colour bar" in p for p in problems)
    plt.close(fig)
    fig, ax = plt.subplots()
    ax.plot(range(5), range(5), label="a")
    ax.plot(range(5), range(1, 6), label="b")
    ax.set(title="t", xlabel="step", ylabel="loss (nats)")
    ax.legend()
    assert figure_problems(fig) == []
    plt.close(fig)


def _browser():  # type: ignore[no-untyped-def]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (`make test` installs them with apt-get; that failed here)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_page_in_a_real_browser(outputs, tmp_path, capsys) -> None:
    html, md = _report([outputs["run-a"], outputs["run-b"], outputs["theory"]], tmp_path / "r", capsys)
    _, headings = _sections(html, md)
    browser = _browser()
    try:
        browser.get(html.resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])"
        )
        shown = browser.execute_script(
            "return Array.from(document.querySelectorAll('h2')).map(h => h.textContent)"
        )
        errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    finally:
        browser.quit()
    assert errors == []
    assert len(images) >= 6 and all(done and width > 0 for done, width, _ in images), images
    assert shown == headings


def test_demo_end_to_end_at_toy_size(tmp_path, monkeypatch, capsys) -> None:
    import qkvlab.demo as demo

    coupled, decoupled, strong, eta_sum = demo.demo_lambdas()
    assert (coupled, decoupled) == (demo.DEMO_REST, 0.0) and strong * eta_sum >= 2.0  # the floor
    assert (strong - 1) * eta_sum < 2.0  # and the smallest whole λ that reaches it
    for key, value in {"max_steps": 8, "warmup_steps": 2, "eval_every": 4, "spectra_every": 4}.items():
        monkeypatch.setitem(demo.DEMO_CHANGES, key, value)
    monkeypatch.setitem(demo.THEORY_SETTINGS, "steps", 300)
    monkeypatch.setitem(demo.THEORY_SETTINGS, "seeds", (0,))
    monkeypatch.setitem(demo.THEORY_SETTINGS, "lambdas", (0.0, 0.3))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--jobs", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    html = Path(lines[-1])
    assert html == tmp_path / "demo" / "report" / "report.html" and html.is_file()
    strong_toy = demo.demo_lambdas()[2]  # recomputed for the toy-size schedule
    assert f"{strong_toy:g} (Σηλ 2" in lines[0]
    _, headings = _sections(html, html.with_suffix(".md"))
    assert headings[0] == "What this page shows"
    assert any(h.startswith("Weight decay and attention rank") for h in headings)
    assert "Training curves" in headings and "Spectra: minilm" in headings and "Theory: theory" in headings
    # idempotent: a second run trains nothing and writes the same page
    assert main(["demo", "--out", str(tmp_path / "demo"), "--jobs", "1"]) == 0
    assert "3 complete, 0 to resume, 0 new" in capsys.readouterr().out


# valid raw HTML for CommonMark (quoted attribute values), so a viewer that passes HTML through runs them
PAYLOADS = [
    '<img src="x" onerror="document.body.dataset.pwned=1">',
    '<svg onload="document.body.dataset.pwned=2">',
    "[click](javascript:document.body.dataset.pwned=3)",
]


def test_both_twins_are_inert_in_a_real_browser(outputs, tmp_path, capsys) -> None:
    """Promise 11: folder names and inspect sources with HTML in them stay text in report.html and in
    report.md as a CommonMark viewer (markdown-it, raw HTML allowed) renders it, opened in Chromium."""
    from markdown_it import MarkdownIt

    paths = []
    for i, payload in enumerate(PAYLOADS):
        run = outputs["tmp"] / payload.replace("/", "∕")  # a folder name cannot hold a slash
        if not run.exists():
            shutil.copytree(outputs["run-a"], run)
        paths.append(run)
        data = json.loads(outputs["inspect"].read_text())
        data["source"] = payload
        (tmp_path / f"inspect{i}.json").write_text(json.dumps(data))
        paths.append(tmp_path / f"inspect{i}.json")
    html, md = _report(paths, tmp_path / "evil", capsys)
    rendered = tmp_path / "evil" / "md.html"  # beside report.md, so its figure links resolve
    rendered.write_text(
        "<!DOCTYPE html><html><body>"
        + MarkdownIt("commonmark", {"html": True}).enable("table").render(md.read_text())
        + "</body></html>"
    )
    browser = _browser()
    try:
        seen = {}
        for page in (html, rendered):
            browser.get(page.resolve().as_uri())
            seen[page.name] = browser.execute_script(
                "return [document.body.getAttribute('data-pwned'),"
                " document.querySelectorAll('script,svg,[onerror],[onload],a[href^=javascript]').length,"
                " document.body.innerText]"
            )
    finally:
        browser.quit()
    for name, (pwned, live, text) in seen.items():
        assert pwned is None and live == 0, name
        assert 'onerror="document.body' in text and "<svg onload" in text, name  # shown, as text


def test_a_failed_report_leaves_nothing_and_reports_of_same_named_paths_do_not_collide(
    outputs, tmp_path, capsys, monkeypatch
) -> None:
    from qkvlab.report import build

    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"kind": "inspect", "schema_version": 2}))  # no heads, no source
    assert main(["report", str(broken)]) == 2
    assert "broken.json" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "report-broken").exists()
    # two runs both called "run", in different places: the second report gets its own folder
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for folder in (a, b):
        shutil.copytree(outputs["run-a"], folder)
    assert main(["report", str(a)]) == 0 and main(["report", str(b)]) == 0
    assert main(["report", str(a)]) == 0  # the same paths again: its own folder, refreshed
    capsys.readouterr()
    made = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert made == ["report-run", "report-run-2"]
    sources = [json.loads((tmp_path / "runs" / m / build.SOURCES).read_text())["paths"] for m in made]
    assert sources == [[str(a.resolve())], [str(b.resolve())]]
    assert not list((tmp_path / "runs").glob("*/.figures-*"))


def test_a_plain_loops_spectra_log_and_stepped_inspect_files_are_drawn_against_the_step(
    tiny_bert, tmp_path, capsys
) -> None:
    """Issue 30: qkvlab.record_spectra in any loop writes the log SpectraCallback writes; report draws it
    (and several `to_json(step=…)` files) against the step instead of overlaying them."""
    import torch
    from transformers import AutoModel

    import qkvlab

    model = AutoModel.from_pretrained(tiny_bert).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    log = tmp_path / "out" / "spectra.jsonl"
    for step in range(1, 7):
        loss = model(input_ids=torch.randint(5, 20, (4, 8))).last_hidden_state.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            report = qkvlab.record_spectra(model, log, step)
            report.to_json(tmp_path / f"at{step}.json", step=step)
    assert model.training  # left in the mode it was in
    series = qkvlab.InspectSeries.from_jsonl(log)
    assert series.steps == [2, 4, 6] and series.x()[1] == "training step"
    _, md = _report([log], tmp_path / "r1", capsys)
    assert "## Over 3 checkpoints: out" in md.read_text()
    _, md = _report([tmp_path / f"at{s}.json" for s in (6, 2, 4)], tmp_path / "r2", capsys)
    text = md.read_text()
    assert "## Over 3 checkpoints: 3 inspect files" in text
    # a log cut short by a crash: the whole lines count, the partial one is skipped
    with log.open("a") as fh:
        fh.write('{"step": 8, "heads": [')
    assert qkvlab.InspectSeries.from_jsonl(log).steps == [2, 4, 6]


def test_a_full_disk_under_report_names_the_figure_and_leaves_nothing(
    outputs, tmp_path, capsys, monkeypatch
) -> None:
    import errno

    import qkvlab.report.figures as figures

    def full(path, data, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(figures, "write_atomic", full)
    out = tmp_path / "rep"
    assert main(["report", str(outputs["run-a"]), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qkvlab report: error: cannot write: {out / 'figures'}/"), err
    assert err[0].endswith("No space left on device") and not out.exists()
