// The chat page as a person uses it, in Debian's headless Chromium (playwright-core drives it;
// no browser is downloaded). Run by tests/it/browser.rs: `node chat.js BASE_URL SCREENSHOT_DIR`.
// Exits non-zero, saying why, on the first thing that does not happen.
"use strict";
const { chromium } = require("playwright-core");

const [base, shots] = process.argv.slice(2);
const WAIT = { timeout: 20000 };

async function texts(page) {
  return page.$$eval("#messages li", (items) =>
    items.map((li) => ({ role: li.className, body: li.querySelector(".body").textContent,
                         state: (li.querySelector(".state") || {}).textContent || "" })));
}

async function until(page, what, test) {
  const deadline = Date.now() + WAIT.timeout;
  for (;;) {
    const now = await texts(page);
    if (test(now)) return now;
    if (Date.now() > deadline) throw new Error(`${what}: never happened; messages: ${JSON.stringify(now)}`);
    await page.waitForTimeout(50);
  }
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const problems = [];
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  page.on("console", (m) => m.type() === "error" && problems.push("console: " + m.text()));

  // Sign up, which signs in.
  await page.goto(base + "/");
  await page.fill("#email", `browser${Date.now()}@example.com`);
  await page.fill("#password", "Correct-Horse-Battery-9");
  await page.click("#signup");
  await page.waitForSelector("#app:not([hidden])", WAIT);

  // A persona from free text: "creating…", then its card.
  await page.fill("#prompt", "Yoda");
  await page.click("#persona-form button[type=submit]");
  if ((await page.textContent("#persona-status")) !== "creating…") throw new Error("no creating… while it is made");
  await page.waitForSelector("#personas li", WAIT);

  // A conversation opens with the greeting.
  await page.click("#personas li button");
  await until(page, "the greeting", (m) => m.length === 1 && m[0].role === "assistant" && m[0].body.length > 0);

  // Two messages, each reply seen while it streams (part of it, then all of it).
  for (const [n, text] of [[3, "Hello there"], [5, "What is the Force?"]]) {
    await page.fill("#text", text);
    await page.click("#send");
    const partial = await until(page, `reply ${n} streaming`, (m) =>
      m.length === n && m[n - 1].body.length > 0 && /pending|streaming/.test(m[n - 1].state));
    const whole = await until(page, `reply ${n} complete`, (m) => m.length === n && m[n - 1].state === "");
    if (!whole[n - 1].body.startsWith(partial[n - 1].body.trim().slice(0, 10)))
      throw new Error(`the streamed part is not the reply's beginning: ${partial[n - 1].body} / ${whole[n - 1].body}`);
  }

  // Regenerate the last reply: a second version, shown as 2/2.
  await page.click("#messages li:last-child button:has-text('Regenerate')");
  await until(page, "the regenerated reply", (m) => m.length === 5 && m[4].state.includes("2/2"));

  // Cancel a reply in flight: it stops, keeping what was written, marked cancelled.
  await page.fill("#text", "Tell me a long story");
  await page.click("#send");
  await until(page, "the third reply streaming", (m) => m.length === 7 && m[6].body.length > 0);
  await page.click("#cancel");
  const cancelled = await until(page, "the cancelled reply", (m) => m.length === 7 && m[6].state.includes("cancelled"));
  await page.screenshot({ path: `${shots}/chat-desktop.png`, fullPage: true });

  // A reload shows the same history.
  await page.reload();
  const again = await until(page, "the history after a reload", (m) => m.length === 7);
  if (JSON.stringify(again.map((m) => m.body)) !== JSON.stringify(cancelled.map((m) => m.body)))
    throw new Error("the history changed across a reload");

  // At phone size, and the accessibility check (axe-core in the page).
  await page.setViewportSize({ width: 390, height: 844 });
  await page.screenshot({ path: `${shots}/chat-phone.png`, fullPage: true });
  // Evaluated through the DevTools protocol: the page's policy forbids injected script tags.
  await page.evaluate(require("fs").readFileSync(require.resolve("axe-core/axe.min.js"), "utf8"));
  const violations = await page.evaluate(async () => (await window.axe.run()).violations
    .filter((v) => v.impact === "serious" || v.impact === "critical")
    .map((v) => `${v.id} (${v.impact}): ${v.nodes.length} nodes`));
  if (violations.length) throw new Error("accessibility: " + violations.join("; "));

  // The API reference renders every operation, from the binary alone.
  await page.goto(base + "/docs");
  await page.waitForSelector(".opblock", WAIT);
  await page.screenshot({ path: `${shots}/docs-phone.png` });

  if (problems.length) throw new Error(problems.join("\n"));
  await browser.close();
  console.log("browser test passed");
})().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
