"""The playground page: served by the gateway as static files (and not at all with the flag off),
then driven in a real headless Chromium against a real `loragate serve` of the demo.

The browser test needs Chromium and its driver from the OS packages (`apt-get install chromium
chromium-driver`; `.ci/run` installs them) and the `selenium` package; without them it is skipped
with the reason. Selenium is pointed at Debian's chromedriver, so nothing is downloaded.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import openai
import pytest

from loragate.demo import DEMO_MODEL_NAME, SKILLS
from loragate.gateway import GatewaySettings, create_app
from loragate.gateway.routes.playground import ASSETS
from loragate.testing import ServeProcess
from tests.fake_engine import FakeEngine
from tests.test_gateway import running_server, wait_for

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "sk-playground-admin"
PROMPT = "moon river cat"


# ----------------------------------------------------------------------------- static files


@pytest.fixture(scope="module")
def fake_url():
    engine = FakeEngine(model_name="fake-base", max_model_len=256, adapters={"alpha": "/x/alpha"})
    with running_server(create_app(engine, GatewaySettings(api_keys=(ADMIN,)))) as url:
        yield url


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_page_and_assets_are_served_without_auth(fake_url):
    for path in ("/", "/playground"):
        r = httpx.get(fake_url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert "<title>loragate playground</title>" in r.text
    parser = _Refs()
    parser.feed(httpx.get(fake_url + "/").text)
    assert parser.refs, "the page links its script and style sheet"
    for ref in parser.refs:  # everything the page loads ships in the package: no CDN
        assert ref.startswith("/playground/static/"), ref
        r = httpx.get(fake_url + ref)
        assert r.status_code == 200 and r.content
        assert r.headers["content-type"] == ASSETS[ref.rsplit("/", 1)[1]].replace("; ", "; ")
    script = httpx.get(fake_url + "/playground/static/playground.js").text
    # only the public API, only same-origin
    assert set(re.findall(r'fetch\("([^"]+)"', script)) == {"/v1/models", "/v1/chat/completions", "/v1/adapters"}
    assert "http://" not in script and "https://" not in script


def test_unknown_asset_is_an_openai_style_404(fake_url):
    for name in ("nope.js", "..%2Fapp.py", "index.html"):
        r = httpx.get(f"{fake_url}/playground/static/{name}")
        assert r.status_code == 404
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_playground_can_be_turned_off():
    engine = FakeEngine(model_name="fake-base", max_model_len=256, adapters={})
    with running_server(create_app(engine, GatewaySettings(playground=False))) as url:
        assert httpx.get(url + "/").status_code == 405  # only LoRAX's POST / is left at the root
        assert httpx.get(url + "/playground").status_code == 404
        assert httpx.get(url + "/playground/static/playground.js").status_code == 404
        assert httpx.get(url + "/v1/models").status_code == 200


def test_cli_flag_turns_it_off(tmp_path):
    from loragate.cli import build_configs, build_parser

    on = build_configs(build_parser().parse_args(["serve", "--model", str(tmp_path)]))
    off = build_configs(build_parser().parse_args(["serve", "--model", str(tmp_path), "--no-playground"]))
    assert on.gateway.playground is True and off.gateway.playground is False


# ----------------------------------------------------------------------------- real browser


def _chromium() -> tuple[str | None, str | None]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    return browser, driver


def _browser_skip_reason() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    browser, driver = _chromium()
    if browser is None or driver is None:
        return "no Chromium/chromedriver found (apt-get install chromium chromium-driver; .ci/run does it)"
    return None



@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """`loragate serve` on the demo, with an admin key, as a user starts it; yielded once its ready
    banner has been written in full (it ends with a blank line after the curl command)."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with ServeProcess(["--api-key", ADMIN], log, env=env, cwd=ROOT) as server:
        wait_for(lambda: re.search(r"try it:\n.*?\n\n", server.log(), re.S), timeout=90, what="the ready banner")
        yield {"url": server.url, "log": log, "env": env}


def test_banner_names_everything_and_its_curl_works(demo_server):
    text = demo_server["log"].read_text()
    url = demo_server["url"]
    assert f"playground   {url}/" in text
    assert DEMO_MODEL_NAME in text
    for name in SKILLS:
        assert name in text
    curl = text[text.index("try it:"):].split("\n", 1)[1]
    curl = curl[: curl.index("\n\n")]  # the command ends at the banner's blank line
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    env = {**demo_server["env"], "LORAGATE_API_KEY": ADMIN}
    out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    import json

    body = json.loads(out.stdout)
    sent = json.loads(shlex.split(curl.replace("\\\n", " "))[-1])
    model, message = sent["model"], sent["messages"][0]["content"]
    assert body["model"] == model and body["choices"][0]["message"]["content"] == SKILLS[model](message)


@pytest.fixture(scope="module")
def browser():
    reason = _browser_skip_reason()
    if reason and os.environ.get("CI"):  # .ci/run installs Chromium: a CI run without it must fail
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    path, driver_path = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = path
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,860", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def _wait(driver, cond, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: cond(d), message=what)


def _open_with_key(driver, url: str, key: str) -> None:
    """Open the page with `key` already in session storage (as after typing it once)."""
    driver.get(url + "/playground/static/logo.svg")  # same origin, no API calls
    driver.execute_script("sessionStorage.clear(); sessionStorage.setItem('loragate.apiKey', arguments[0]);", key)
    driver.get(url + "/")


@pytest.mark.slow
def test_playground_in_a_real_browser(browser, demo_server, tmp_path):
    from selenium.webdriver.common.by import By

    url = demo_server["url"]
    _open_with_key(browser, url, ADMIN)
    chips = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model-list input"), 30, "model list")
    assert {c.get_attribute("value") for c in chips} == set(SKILLS)
    # the admin table lists every adapter with its tier
    rows = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#adapters-table tbody tr"), 30, "adapters")
    assert {r.get_attribute("data-adapter") for r in rows} == set(SKILLS) - {DEMO_MODEL_NAME}
    for r in rows:
        assert r.find_elements(By.CSS_SELECTOR, ".tier")[0].text in ("device", "cpu", "disk")

    # three models, one prompt
    picked = [DEMO_MODEL_NAME, *[m for m in SKILLS if m != DEMO_MODEL_NAME][:2]]
    for c in chips:
        if (c.get_attribute("value") in picked) != c.is_selected():
            c.click()
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    browser.find_element(By.ID, "send").click()
    columns = _wait(browser, lambda d: (cs := d.find_elements(By.CSS_SELECTOR, "#columns .column"))
                    and all(c.get_attribute("data-state") in ("done", "error") for c in cs) and cs,
                    120, "three finished columns")
    assert [c.get_attribute("data-model") for c in columns] == picked
    client = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN, max_retries=0, timeout=60)
    for column in columns:
        model = column.get_attribute("data-model")
        assert column.get_attribute("data-state") == "done", column.text
        shown = column.find_element(By.CSS_SELECTOR, ".output").get_attribute("textContent")
        api = client.chat.completions.create(model=model, temperature=0, max_tokens=128,
                                             messages=[{"role": "user", "content": PROMPT}])
        assert shown == api.choices[0].message.content, model
        assert int(column.find_element(By.CSS_SELECTOR, ".ntok").text) == api.usage.completion_tokens
        assert column.find_element(By.CSS_SELECTOR, ".ttft").text.endswith(("ms", "s"))
        assert re.fullmatch(r"[\d.]+", column.find_element(By.CSS_SELECTOR, ".tps").text)
    # the table follows: every picked adapter has served a request now
    _wait(browser, lambda d: all(
        int(d.find_element(By.CSS_SELECTOR, f'#adapters-table tr[data-adapter="{m}"] td:nth-child(5)').text) >= 1
        for m in picked[1:]), 30, "requests served in the adapter table")
    shot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    assert _console_errors(browser) == []

    # a wrong key: the API's 401 message, as the API words it
    key = browser.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys("sk-wrong")
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    banner = _wait(browser, lambda d: (b := d.find_element(By.ID, "banner")).is_displayed() and b, 30, "401 banner")
    wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["message"] in banner.text and "401" in banner.text
    assert browser.execute_script("return sessionStorage.getItem('loragate.apiKey')") == "sk-wrong"
    assert browser.execute_script("return localStorage.length") == 0  # the key never leaves the session
