"""Headless Chromium driven by Selenium, for the web interface's tests.

Debian's chromium and its chromedriver (scripts/install-test-deps installs
both); Selenium is told where chromedriver is, so it never tries to fetch
one. The web server must run in another process (MiltermanagerProcess):
Selenium's calls block.

Screenshots go to $MILTER_MANAGER_TEST_ARTIFACTS, else web-screenshots/ in
the directory the tests run in (trial's _trial_temp), and are kept.
"""

import os
import shutil
import tempfile

CHROMEDRIVER = "/usr/bin/chromedriver"


def artifacts_directory():
    directory = os.environ.get("MILTER_MANAGER_TEST_ARTIFACTS") or os.path.abspath(
        "web-screenshots")
    os.makedirs(directory, exist_ok=True)
    return directory


class Browser:
    """One headless Chromium. base: the web endpoint's URL without a trailing slash."""

    def __init__(self, base, width=1280, height=1000):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.base = base
        self.profile = tempfile.mkdtemp(prefix="milter-manager-test-chromium.")
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
                         f"--window-size={width},{height}", "--no-first-run",
                         "--disable-extensions", "--disable-background-networking"):
            options.add_argument(argument)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)

    def get(self, path):
        self.driver.get(self.base + path)

    def find(self, css):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait_for(self, condition, timeout=15, message=""):
        """Wait until condition(driver) is true (it is also given the driver); its value."""
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(condition, message)

    def login(self, user, password):
        """Log in through the login form; returns once the page after it has loaded."""
        self.get("/login")
        self.find("input[name=user]").send_keys(user)
        self.find("input[name=password]").send_keys(password)
        self.find("form.login button[type=submit]").click()
        self.wait_for(lambda driver: "/login" not in driver.current_url,
                      message=f"still on the login page: {self.driver.page_source[:500]}")

    def screenshot(self, name):
        """Save a PNG of the viewport as NAME.png among the artifacts; its path."""
        path = os.path.join(artifacts_directory(), f"{name}.png")
        self.driver.save_screenshot(path)
        return path

    def quit(self):
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


def start_browser(testcase, base):
    """A Browser on base, quit at the end of testcase."""
    browser = Browser(base)
    testcase.addCleanup(browser.quit)
    return browser
