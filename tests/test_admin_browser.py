"""An operator retries a failed upload in the admin, in a real headless Chromium.

Uses Debian's chromium and chromium-driver, never a browser or driver Selenium would fetch.
Skipped when the browser is missing, unless REQUIRE_BROWSER=1 (as in CI), where that fails.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from django.urls import reverse

from tests.factories import make_task
from uploads.models import Status, UploadTask

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ERROR = "instance 'web9' not found in project 'default'"
WAIT_SECONDS = 10

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not CHROMIUM.exists() and os.environ.get("REQUIRE_BROWSER") != "1",
        reason="needs /usr/bin/chromium (apt-get install chromium chromium-driver)",
    ),
]


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator["WebDriver"]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install chromium chromium-driver")
    # Imported here so a machine without the browser skips without needing Selenium either.
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def test_operator_retries_a_failed_upload(
    browser: "WebDriver", live_server: Any, django_user_model: Any, user: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(browser, WAIT_SECONDS)
    django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    task = make_task(user, instance="web9")
    UploadTask.objects.filter(pk=task.pk).update(status=Status.FAILED, last_error=ERROR)
    still_pending = make_task(user, instance="web1")

    browser.get(f"{live_server.url}/admin/")
    browser.find_element(By.ID, "id_username").send_keys("root")
    browser.find_element(By.ID, "id_password").send_keys("pw-root-123")
    browser.find_element(By.CSS_SELECTOR, "#login-form [type=submit]").click()

    changelist = reverse("admin:uploads_uploadtask_changelist")
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f'a[href="{changelist}"]'))).click()
    wait.until(ec.presence_of_element_located((By.ID, "queue-summary")))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")) == 2

    failed_filter = "//nav[@id='changelist-filter']//a[normalize-space()='Failed']"
    wait.until(ec.element_to_be_clickable((By.XPATH, failed_filter))).click()
    wait.until(ec.url_contains("status__exact=failed"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert [row.find_element(By.CSS_SELECTOR, ".field-short_id").text for row in rows] == [
        str(task.pk)[:8]
    ]
    assert ERROR in rows[0].text
    assert str(still_pending.pk)[:8] not in browser.page_source

    rows[0].find_element(By.CSS_SELECTOR, "input.action-select").click()
    Select(browser.find_element(By.NAME, "action")).select_by_visible_text("Retry selected uploads")
    browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()

    message = wait.until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, ".messagelist .success"))
    )
    assert message.text == "Retried 1 upload."
    task.refresh_from_db()
    assert task.status == Status.PENDING
    assert browser.find_element(By.CSS_SELECTOR, ".queue-count-failed dd").text == "0"
    assert browser.find_element(By.CSS_SELECTOR, ".queue-count-pending dd").text == "2"

    browser.get(live_server.url + reverse("admin:uploads_uploadtask_change", args=[task.pk]))
    badge = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".upload-status")))
    assert badge.text == "Pending"
