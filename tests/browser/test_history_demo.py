"""
The demo page's "channel history" panel in headless Chromium, against
etc/development.ini as shipped (its ``[route:feed]``): the page's subscriber
sees each message with its offset, is cut, misses two messages the page
publishes meanwhile, and on restore reconnects with ``?since=&epoch=`` and
shows them as recovered, in order, before the live ones
(docs/protocol.md#channel-history-and-recovery).
"""

from __future__ import annotations

import configparser
import re

from playwright.sync_api import expect

from support.gateway import default_config
from support.metrics_text import get as metric
from support.metrics_text import scrape
from support.waiting import wait_for

# launch and playwright are fixtures: imported, pytest finds them here
from .test_browser import WAIT_MS, csp_violations, launch, playwright, spki_sha256  # noqa: F401


def test_demo_page_history_panel_recovers_what_a_cut_subscriber_missed(tmp_path, start_gateway, launch):
    config, port, tls_port = default_config(tmp_path)
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(config)
    admin = int(re.fullmatch(r"tcp:(\d+):.*", ini["admin"]["listen"].strip())[1])
    tls_dir = tmp_path / "var" / "tls"
    # start_gateway writes the INI into tmp_path itself: point it at var/tls/ directly
    start_gateway(config.read_text().replace("../var/tls/", f"{tls_dir}/"), port=port)

    def published() -> float:
        return metric(scrape(admin), "wsgateway_broadcast_messages_total") or 0

    browser = launch(f"--ignore-certificate-errors-spki-list={spki_sha256(tls_dir / 'cert.pem')}")
    page = browser.new_page()
    violations = csp_violations(page)
    page.goto(f"http://127.0.0.1:{admin}/demo")
    state, last_offset, last_epoch = page.locator("#history-state"), page.locator("#last-offset"), page.locator(
        "#last-epoch")
    panel = page.locator("#history-log")
    live, recovered = panel.locator(".live"), panel.locator(".recovered")
    expect(panel.locator(".event").first).to_have_text(f"subscriber connecting to wss://127.0.0.1:{tls_port}/feed/demo")
    expect(state).to_have_text("connected", timeout=WAIT_MS)
    expect(panel).to_contain_text("subscriber connected, subprotocol wsgateway.json")
    expect(page.locator("#publish")).to_be_enabled(timeout=WAIT_MS)
    expect(last_offset).to_have_text("none")

    def publish(message: str) -> None:
        page.locator("#publish-message").fill(message)
        page.locator("#publish").click()

    publish("a")
    expect(live).to_have_text(["offset 1: a"], timeout=WAIT_MS)
    expect(last_offset).to_have_text("1")
    epoch = last_epoch.inner_text()
    assert re.fullmatch(r"\S+", epoch) and epoch != "none"

    page.locator("#cut").click()
    expect(state).to_have_text("cut")
    expect(page.locator("#restore")).to_be_enabled(timeout=WAIT_MS)  # once the close handshake is done
    expect(page.locator("#cut")).to_be_disabled()
    publish("b")
    publish("c")
    expect(panel.locator(".sent")).to_have_text(["published: a", "published: b", "published: c"])
    # the gateway has both in the channel's history before the subscriber comes back
    assert wait_for(lambda: published() == 3), published()
    expect(live).to_have_count(1)  # nothing reached the cut subscriber

    page.locator("#restore").click()
    expect(panel.locator(".event").filter(has_text="subscriber connecting")).to_have_text([
        f"subscriber connecting to wss://127.0.0.1:{tls_port}/feed/demo",
        f"subscriber connecting to wss://127.0.0.1:{tls_port}/feed/demo?since=1&epoch={epoch}",
    ])
    expect(state).to_have_text("connected", timeout=WAIT_MS)
    expect(panel.locator(".status")).to_have_text([f"recovered: true, offset 3, epoch {epoch}"], timeout=WAIT_MS)
    expect(recovered).to_have_text(["offset 2: b (recovered)", "offset 3: c (recovered)"], timeout=WAIT_MS)
    expect(last_offset).to_have_text("3")

    publish("d")
    expect(live).to_have_text(["offset 1: a", "offset 4: d"], timeout=WAIT_MS)
    expect(last_offset).to_have_text("4")
    expect(last_epoch).to_have_text(epoch)
    # in the order the subscriber got them: the recovered frame, the missed messages, then live
    kinds = panel.locator("li.status, li.recovered, li.live")
    expect(kinds).to_have_text([
        "offset 1: a",
        f"recovered: true, offset 3, epoch {epoch}",
        "offset 2: b (recovered)",
        "offset 3: c (recovered)",
        "offset 4: d",
    ])
    expect(panel.locator(".error")).to_have_count(0)
    expect(page.locator("#log .error")).to_have_count(0)  # the echo part next to it is untouched
    assert violations == []

    # the gateway's side: one recovery with since=, which sent every missed message
    samples = scrape(admin)
    assert metric(samples, "wsgateway_history_recoveries_total", route="feed", result="recovered") == 1
    assert metric(samples, "wsgateway_history_recoveries_total", route="feed", result="gap") in (None, 0)
    assert metric(samples, "wsgateway_broadcast_messages_total") == 4
