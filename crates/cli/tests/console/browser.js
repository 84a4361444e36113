// A real browser for the console tests: Debian's Chromium driven by playwright-core, answering
// one JSON command per stdin line with one JSON line on stdout, so the Rust test drives it
// step by step (and commits to Delta between steps).
//
//   node browser.js <playwright-core dir> <base url>
//   {"cmd": "goto", "path": "/"} | {"cmd": "text", "selector": "..."} | {"cmd": "waitText",
//   "selector": "...", "contains": "...", "timeout": ms} | {"cmd": "click", "selector": "..."} |
//   {"cmd": "fill", "selector": "...", "value": "..."} | {"cmd": "press", "selector": "...",
//   "key": "Enter"} | {"cmd": "count", "selector": "..."} | {"cmd": "attr", "selector", "name"} |
//   {"cmd": "screenshot", "path": "..."} | {"cmd": "viewport", "width": n, "height": n} |
//   {"cmd": "reload"} | {"cmd": "storage"} | {"cmd": "problems"} | {"cmd": "close"}
"use strict";

const path = require("path");
const readline = require("readline");

const [dir, base] = process.argv.slice(2);
const { chromium } = require(path.join(dir, "node_modules", "playwright-core"));

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.LAKESYNC_TEST_CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage();
  // Everything that would make an operator's console wrong: script errors, console errors,
  // failed requests, and any request to another host.
  const problems = [];
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  page.on("console", (m) => { if (m.type() === "error") problems.push("console error: " + m.text()); });
  page.on("request", (r) => { if (!r.url().startsWith(base) && !r.url().startsWith("data:")) problems.push("request to another host: " + r.url()); });
  page.on("requestfailed", (r) => problems.push("request failed: " + r.url() + " " + (r.failure() || {}).errorText));
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    const c = JSON.parse(line);
    let value = null, error = null;
    try {
      switch (c.cmd) {
        case "goto": await page.goto(base + c.path); break;
        case "reload": await page.reload(); break;
        case "text": value = await page.locator(c.selector).first().textContent({ timeout: c.timeout || 10000 }); break;
        case "waitText":
          await page.locator(c.selector).filter({ hasText: c.contains }).first().waitFor({ timeout: c.timeout || 10000 });
          value = await page.locator(c.selector).first().textContent();
          break;
        case "waitGone": await page.locator(c.selector).first().waitFor({ state: "detached", timeout: c.timeout || 10000 }); break;
        case "click": await page.locator(c.selector).first().click({ timeout: c.timeout || 10000 }); break;
        case "fill": await page.locator(c.selector).first().fill(c.value); break;
        case "press": await page.locator(c.selector).first().press(c.key); break;
        case "focus": await page.locator(c.selector).first().focus(); break;
        case "keyboard": await page.keyboard.press(c.key); break;
        case "focused": value = await page.evaluate(() => document.activeElement && (document.activeElement.id || document.activeElement.textContent)); break;
        case "count": value = await page.locator(c.selector).count(); break;
        case "attr": value = await page.locator(c.selector).first().getAttribute(c.name); break;
        case "order": value = await page.locator(c.selector).evaluateAll((els, a) => els.map((e) => e.getAttribute(a)), c.name); break;
        case "viewport": await page.setViewportSize({ width: c.width, height: c.height }); break;
        case "scrollWidth": value = await page.evaluate(() => document.documentElement.scrollWidth); break;
        case "screenshot": await page.screenshot({ path: c.path, fullPage: Boolean(c.full) }); break;
        case "storage": value = await page.evaluate(() => ({ session: { ...sessionStorage }, local: { ...localStorage }, cookies: document.cookie })); break;
        case "problems": value = problems.splice(0); break;
        case "close": await browser.close(); process.stdout.write(JSON.stringify({ ok: true }) + "\n"); process.exit(0);
        default: throw new Error("unknown command " + c.cmd);
      }
    } catch (e) {
      error = String(e && e.message || e);
    }
    process.stdout.write(JSON.stringify(error === null ? { ok: true, value } : { ok: false, error }) + "\n");
  }
  await browser.close();
})().catch((e) => { process.stdout.write(JSON.stringify({ ok: false, error: "browser: " + e.message }) + "\n"); process.exit(1); });
