"""The MLflow and Prefect UIs, looked at in headless Chromium after `mnistops demo --fast`.

Uses the system's Chromium and ChromeDriver (Debian: chromium, chromium-driver); Selenium
is told where both are, so it downloads nothing. Screenshots go to test-output/screenshots.
Without a browser these tests skip, unless MNISTOPS_REQUIRE_BROWSER=1 (CI) makes that fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from mlflow import MlflowClient

from tests.helpers import SHOTS

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def wait_for(check: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def open_page(driver, url: str, expected: list[str], shot: str) -> str:
    """Load `url` and wait until every expected text shows; save a screenshot either way."""
    driver.get(url)
    found = wait_for(lambda: all(e in page_text(driver) for e in expected))
    driver.save_screenshot(str(SHOTS / f"{shot}.png"))
    text = page_text(driver)
    assert found, f"{url}: missing {[e for e in expected if e not in text]}; page:\n{text[:2000]}"
    return text


def close_mlflow_assistant(driver) -> None:
    """MLflow 3 opens an assistant panel that hides the right half of the runs table."""
    from selenium.webdriver.common.by import By

    driver.implicitly_wait(2)
    buttons = driver.find_elements(
        By.XPATH,
        "//*[text()='MLflow Assistant']/ancestor::*[count(.//button)>=3][1]"
        "//button[@aria-label='Close']",
    )
    driver.implicitly_wait(20)
    if buttons:
        buttons[0].click()


def test_mlflow_lists_the_demo_runs_with_test_accuracy(demo_run: dict, browser) -> None:
    from selenium.webdriver.common.by import By

    settings = demo_run["settings"]
    client = MlflowClient(settings.mlflow_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3, "v1.0's experiment, v2.0's Quick run, v3.0's triggered run"
    url = f"{settings.mlflow_uri}/#/experiments/{experiment.experiment_id}/runs"
    open_page(browser, url, [r.info.run_name for r in runs], "mlflow-runs-loading")
    close_mlflow_assistant(browser)
    browser.find_element(By.XPATH, "//button[normalize-space()='Columns']").click()
    browser.find_element(By.XPATH, "//span[normalize-space()='test_accuracy']").click()
    browser.find_element(By.TAG_NAME, "body").send_keys("\ue00c")  # Escape closes the menu
    # The table rounds to 4 decimals and drops trailing zeros (0.0950 shows as 0.095).
    shown = [f"{r.data.metrics['test_accuracy']:.4f}".rstrip("0") for r in runs]
    assert wait_for(lambda: all(value in page_text(browser) for value in shown)), (
        f"test accuracies {shown} not in the runs table:\n{page_text(browser)[:2000]}"
    )
    browser.save_screenshot(str(SHOTS / "mlflow-runs.png"))
    text = page_text(browser)
    assert settings.experiment_name in text
    assert all(f"MNIST@v{n}.0" in text for n in (1, 2, 3))


def test_mlflow_registry_shows_the_champion(demo_run: dict, browser) -> None:
    settings = demo_run["settings"]
    name = settings.model_registry.name
    text = open_page(
        browser, f"{settings.mlflow_uri}/#/models/{name}", [name, "@ champion"], "mlflow-model"
    )
    assert "Version 2" in text and "Version 1" in text


def test_prefect_shows_the_flow_the_deployment_and_the_quick_run(demo_run: dict, browser) -> None:
    settings = demo_run["settings"]
    ui = settings.prefect_api_url.removesuffix("/api")
    deployment = settings.deployment
    open_page(browser, f"{ui}/flows", [deployment.flow_name, "1 Deployment"], "prefect-flows")
    open_page(
        browser,
        f"{ui}/deployments",
        [deployment.deploy_name, "At 03:00 AM every day", "Ready"],
        "prefect-deployments",
    )
    text = open_page(browser, f"{ui}/runs", ["quick-run", "Completed"], "prefect-runs")
    assert "Failed" not in text.split("Flow runs", 1)[-1]
