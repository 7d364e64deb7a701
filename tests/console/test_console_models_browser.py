"""The Status page's served models (/readyz `default_model` and `models`): one row per model, the
default marked, and no /readyz field ever shown as raw JSON, with one model served and with two
(FACE_MODELS: SFace, the default, and harness/models.py's tiny ONNX)."""

from __future__ import annotations

import re

import httpx
import pytest

from harness.models import tiny_model
from tests.console.browser import DESKTOP, PHONE, Console
from tests.console.conftest import KEY
from tests.server import ServerProcess

TINY_DIM = 64
# every element of the Status page whose own text has a brace: JSON text shown as it came
RAW_JSON = """
return [...document.querySelectorAll('#page-status *')]
  .filter(e => [...e.childNodes].some(n => n.nodeType === Node.TEXT_NODE && /[{}]/.test(n.textContent)))
  .map(e => e.id || e.tagName + ': ' + e.textContent.slice(0, 80))"""


@pytest.fixture(scope="module")
def two_model_server(tmp_path_factory, default_model):
    tiny = tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx", dim=TINY_DIM)
    proc = ServerProcess(tmp_path_factory.mktemp("console-models") / "data",
                         env={"FACE_API_KEY": KEY, "FACE_MODELS": f"sface={default_model},tiny={tiny}"})
    proc.wait_ready()
    yield proc
    proc.stop()


def readyz(server) -> dict:
    r = httpx.get(server.url + "/readyz", headers={"X-API-Key": KEY}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def status_page(driver, server) -> Console:
    page = Console(driver, server.url)
    page.open("try")
    page.js("sessionStorage.setItem('face-console.api-key', arguments[0])", KEY)
    page.open("status")
    page.wait_text("status-model", "Impostor tail")
    return page


def model_rows(page: Console) -> dict[str, dict[str, str]]:
    """Each served model's row: its cells by column header (the name cell under "Name")."""
    page.wait(lambda: page.find("status-models-card").is_displayed(), "no served models card")
    return page.js("""
        const table = document.getElementById('status-models');
        const heads = [...table.tHead.rows[0].cells].map(c => c.textContent.trim());
        return Object.fromEntries([...table.tBodies[0].rows].map(r => [r.dataset.name,
          Object.fromEntries([...r.cells].map((c, i) => [heads[i], c.textContent.trim()]))]));""")


def no_raw_json(page: Console) -> None:
    assert page.js(RAW_JSON) == []
    text = page.text("page-status")
    assert "{" not in text and "}" not in text and '":' not in text, text


def test_two_models_each_get_a_row_the_default_marked(driver, two_model_server):
    ready = readyz(two_model_server)
    assert ready["default_model"] == "sface" and set(ready["models"]) == {"sface", "tiny"}
    page = status_page(driver, two_model_server)
    rows = model_rows(page)
    assert list(rows) == ["sface", "tiny"]  # the service's order: the default first
    sface, tiny = rows["sface"], rows["tiny"]
    assert sface["Name"] == "sfacedefault" and tiny["Name"] == "tiny"  # the name and its "default" tag
    assert sface["Model"] == ready["model_id"] and sface["Embedding size"] == "128"
    assert tiny["Model"] == "tiny@1" and tiny["Embedding size"] == str(TINY_DIM)
    for row in (sface, tiny):
        assert row["Provider"] == "CPUExecutionProvider" and row["Ready"] == "ready"
    assert sface["Impostor tail"] == "the model's" and tiny["Impostor tail"] == "none"  # tiny has neither
    assert sface["Quality"] == "the model's" and tiny["Quality"] == "none"
    assert page.text("status-model-title") == "Default model"
    model = page.text("status-model")
    assert "default_model" not in model and "models" not in model  # no raw keys in the Model card
    no_raw_json(page)


def test_one_model_gets_one_row_and_the_model_card_is_unchanged(driver, console_server):
    ready = readyz(console_server)
    page = status_page(driver, console_server)
    rows = model_rows(page)
    assert list(rows) == [ready["default_model"]]
    row = rows[ready["default_model"]]
    assert row["Name"] == f"{ready['default_model']}default" and row["Model"] == ready["model_id"]
    assert row["Ready"] == "ready" and row["Impostor tail"] == "the model's"
    assert page.text("status-model-title") == "Model"
    model = page.text("status-model")
    assert ready["model_id"] in model and f"{ready['identify_threshold']:.3f}" in model
    assert "the model's, measured down to FAR" in model
    no_raw_json(page)


def test_fields_the_console_does_not_know_are_shown_as_key_value_text(driver, console_server):
    """A newer service's fields (here injected into the /readyz answer) read as "key: value", nested
    objects in parentheses, never as JSON; an unknown per-model field gets a column of its own."""
    page = status_page(driver, console_server)
    page.js("""
        const real = window.fetch;
        window.fetch = async (url, init) => {
          const r = await real(url, init);
          if (!String(url).endsWith('/readyz')) return r;
          const body = await r.json();
          body.shards = { primary: { healthy: true, lag_ms: 12 }, replicas: [1, 2] };
          body.notes = [];
          for (const m of Object.values(body.models)) m.warmup = { batches: [1, 2, 4] };
          return new Response(JSON.stringify(body), { status: r.status, headers: { 'Content-Type': 'application/json' } });
        };""")
    page.find("status-refresh").click()
    model = page.wait_text("status-model", "shards")
    assert "primary: (healthy: yes, lag_ms: 12), replicas: (1, 2)" in model, model
    assert re.search(r"notes\s+none", model), model  # an empty list
    rows = model_rows(page)
    page.wait(lambda: "warmup" in model_rows(page)[next(iter(rows))], "no column for the new model field")
    assert model_rows(page)[next(iter(rows))]["warmup"] == "batches: (1, 2, 4)"
    no_raw_json(page)


def test_served_models_fit_a_phone(driver, two_model_server):
    driver.set_window_size(*PHONE)
    try:
        page = status_page(driver, two_model_server)
        model_rows(page)
        assert page.js("return document.documentElement.scrollWidth - window.innerWidth") <= 0
        cells = page.js("return [...document.querySelectorAll('#status-models tbody tr[data-name=tiny] td')]"
                        ".map(td => getComputedStyle(td, '::before').content)")
        assert '"Model: "' in cells and '"Ready: "' in cells, cells  # each cell says its column
    finally:
        driver.set_window_size(*DESKTOP)
