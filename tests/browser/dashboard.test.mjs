// Drives GET /dashboard in Debian's headless chromium (playwright-core, no
// downloaded browser) against `proxypal-server --dev` (the simulated NVIDIA
// upstream): rows and counts match /stats and follow new traffic, the
// sparklines draw, and with auth.tokens set the page asks for a token.
//
// Run with tests/browser/run.sh (installs chromium and playwright-core, builds
// the server). Env: PROXYPAL_BIN (default target/debug/proxypal-server),
// CHROMIUM (default /usr/bin/chromium), SCREENSHOT (default docs/img/dashboard.png).

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import net from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { randomBytes } from "node:crypto";
import { chromium } from "playwright-core";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = process.env.PROXYPAL_BIN || join(ROOT, "target/debug/proxypal-server");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SCREENSHOT = process.env.SCREENSHOT || join(ROOT, "docs/img/dashboard.png");
const TOTAL_TIMEOUT_MS = 60_000;
const HISTORY_INTERVAL_MS = 1000; // test-only override of the 10 s sampling interval
const MODEL = "meta/llama-3.1-8b-instruct";

const started = Date.now();
const children = new Set();
const scratch = mkdtempSync(join(tmpdir(), "proxypal-browser-"));
let context = null;

// Hard stop: whatever hangs, kill what we started and fail.
const watchdog = setTimeout(() => {
  console.error(`browser test: over ${TOTAL_TIMEOUT_MS} ms, aborting`);
  for (const c of children) killChild(c, "SIGKILL");
  process.exit(1);
}, TOTAL_TIMEOUT_MS);
watchdog.unref();

after(async () => {
  if (context) await context.close().catch(() => {});
  for (const c of children) await stopServer(c);
  rmSync(scratch, { recursive: true, force: true });
  console.log(`browser test: ${((Date.now() - started) / 1000).toFixed(1)} s in all`);
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
  return new Promise((res, rej) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", rej);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
  });
}

function killChild(child, signal) {
  try {
    process.kill(child.pid, signal);
  } catch {
    /* already gone */
  }
}

async function stopServer(child) {
  if (child.exitCode !== null || child.signalCode !== null) {
    children.delete(child);
    return;
  }
  const exited = new Promise((r) => child.once("exit", r));
  killChild(child, "SIGTERM");
  const done = await Promise.race([exited.then(() => true), sleep(5000).then(() => false)]);
  if (!done) {
    killChild(child, "SIGKILL");
    await exited;
  }
  children.delete(child);
}

/** Starts `proxypal-server --dev [--config file]` on a free port; resolves once /health answers. */
async function startServer(configPath) {
  const port = await freePort();
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("PROXYPAL_")));
  env.PROXYPAL_LISTEN = `127.0.0.1:${port}`;
  env.PROXYPAL_HISTORY_INTERVAL_MS = String(HISTORY_INTERVAL_MS);
  env.RUST_LOG = env.RUST_LOG || "warn";
  const args = ["--dev", ...(configPath ? ["--config", configPath] : [])];
  const child = spawn(BIN, args, { env, stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  let output = "";
  child.stdout.on("data", (d) => (output += d));
  child.stderr.on("data", (d) => (output += d));
  const base = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`server exited with ${child.exitCode}:\n${output}`);
    try {
      const r = await fetch(`${base}/health`, { signal: AbortSignal.timeout(1000) });
      if (r.ok) break;
    } catch {
      /* not yet */
    }
    if (Date.now() > deadline) throw new Error(`server did not answer /health:\n${output}`);
    await sleep(100);
  }
  assert.match(output, new RegExp(`http://127\\.0\\.0\\.1:${port}/dashboard`), "the --dev banner shows the dashboard");
  return { child, base, output: () => output };
}

async function chat(base, token, { allow = [200] } = {}) {
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = `Bearer ${token}`;
  const r = await fetch(`${base}/v1/chat/completions`, {
    method: "POST",
    headers,
    body: JSON.stringify({ model: MODEL, messages: [{ role: "user", content: "Hello" }] }),
    signal: AbortSignal.timeout(10_000),
  });
  await r.arrayBuffer();
  assert.ok(allow.includes(r.status), `chat completion through the proxy answered ${r.status}`);
  return r.status;
}

async function traffic(base, n, { token, gapMs = 0 } = {}) {
  for (let i = 0; i < n; i++) {
    await chat(base, token);
    if (gapMs) await sleep(gapMs);
  }
}

async function stats(base, token) {
  const r = await fetch(`${base}/stats`, {
    headers: token ? { authorization: `Bearer ${token}` } : {},
    signal: AbortSignal.timeout(5000),
  });
  assert.equal(r.status, 200, "/stats");
  return r.json();
}

/** What the page shows, one object per key row. */
function pageRows(page) {
  return page.$$eval("#key-rows tr[data-key]", (trs) =>
    trs.map((tr) => {
      const f = (name) => tr.querySelector(`td[data-field="${name}"]`)?.textContent ?? null;
      return {
        key: tr.dataset.key,
        name: f("name"),
        state: tr.dataset.state,
        stateLabel: tr.querySelector('[data-field="state-label"]')?.textContent ?? null,
        requests: Number(f("requests")),
        errors: Number(f("errors")),
        rate_limited: Number(f("rate_limited")),
        permits: f("permits_available"),
      };
    }),
  );
}

function expectedRows(s) {
  return s.keys.map((k) => ({
    key: k.key,
    // The name cell shows the account under the name (a Groq key in --dev shares its provider's budget).
    name: (k.name ?? "—") + (k.account != null ? "account " + k.account : ""),
    state: k.state,
    stateLabel: k.state.replace("_", " "),
    requests: k.requests,
    errors: k.errors,
    rate_limited: k.rate_limited,
  }));
}

/** Waits (bounded) until the page's rows and totals equal a fresh /stats. */
async function waitForMatch(page, base, token, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await stats(base, token);
    const rows = await pageRows(page);
    const shown = rows.map(({ permits, ...r }) => r);
    const total = Number(await page.textContent('[data-total="requests"]'));
    const want = expectedRows(s);
    const same = JSON.stringify(shown) === JSON.stringify(want) && total === s.totals.requests;
    if (same || Date.now() > deadline) {
      assert.deepEqual(shown, want, "page rows match /stats");
      assert.equal(total, s.totals.requests, "page total matches /stats");
      for (const r of rows) assert.match(r.permits, /^\d+$/, "permits available is a count");
      return s;
    }
    await sleep(200);
  }
}

function watchPage(page, problems) {
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
}

async function browser() {
  if (!context) {
    const profile = join(scratch, "profile");
    mkdirSync(profile);
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      viewport: { width: 1440, height: 540 },
      colorScheme: "light",
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
  }
  return context;
}

test("dashboard rows follow /stats in --dev", { timeout: 45_000 }, async () => {
  const server = await startServer(null);
  try {
    const { base } = server;
    await traffic(base, 12, { gapMs: 120 });

    const page = await (await browser()).newPage();
    const problems = [];
    watchPage(page, problems);
    const resp = await page.goto(`${base}/dashboard`);
    assert.equal(resp.status(), 200);
    assert.match(resp.headers()["content-security-policy"] ?? "", /default-src 'none'/);
    await page.waitForSelector("#key-rows tr[data-key]", { timeout: 10_000 });
    assert.equal(await page.getAttribute("body", "data-state"), "ok");
    assert.equal(await page.isVisible("#dev-badge"), true, "dev-mode badge");
    assert.equal(await page.isVisible("#token-input"), false, "no token prompt without auth.tokens");

    const first = await waitForMatch(page, base);
    assert.equal(first.keys.filter((k) => k.provider === "nvidia").length, 3, "--dev has three NVIDIA keys");
    assert.equal(first.keys.filter((k) => k.provider === "groq").length, 1, "--dev has one Groq key");
    assert.equal(first.totals.requests, 12);
    for (const k of first.keys) assert.match(k.key, /^nvapi-…\w{4}$/);
    const before = await pageRows(page);

    await traffic(base, 6, { gapMs: 100 });
    const second = await waitForMatch(page, base);
    assert.equal(second.totals.requests, 18);
    const afterRows = await pageRows(page);
    assert.equal(
      afterRows.reduce((n, r) => n + r.requests, 0) - before.reduce((n, r) => n + r.requests, 0),
      6,
      "the page's counts moved by the new traffic",
    );

    // Sparklines: path data for every key, and at least one that is not flat.
    const deadline = Date.now() + 8_000;
    let paths;
    for (;;) {
      paths = await page.$$eval('#key-rows svg[data-field="sparkline"] path.line', (ps) =>
        ps.map((p) => p.getAttribute("d") || ""),
      );
      const ys = (d) => [...d.matchAll(/[ML][\d.]+,([\d.]+)/g)].map((m) => Number(m[1]));
      const drawn = paths.length === first.keys.length && paths.every((d) => /^M/.test(d));
      const moving = paths.some((d) => new Set(ys(d)).size > 1);
      if ((drawn && moving) || Date.now() > deadline) {
        assert.ok(drawn, `a sparkline per key: ${JSON.stringify(paths)}`);
        assert.ok(moving, `some sparkline shows the traffic: ${JSON.stringify(paths)}`);
        break;
      }
      await sleep(250);
    }
    const history = (await stats(base)).history;
    assert.equal(history.interval_ms, HISTORY_INTERVAL_MS);
    assert.ok(Object.values(history.keys).flat().some((n) => n > 0), "history has traffic");

    assert.deepEqual(problems, [], "no console errors or CSP violations");
    await page.close();
  } finally {
    await stopServer(server.child);
  }
});

const testKey = () => `nvapi-${randomBytes(24).toString("base64url").replace(/[-_]/g, "x")}`;

test("a key cooling down after an upstream 429 is shown as such (and screenshot)", { timeout: 30_000 }, async () => {
  // The simulator allows each key rate_limit.requests_per_minute (12) per
  // rolling minute; "spare" is allowed far more by the proxy, so it runs into
  // the simulator's 429 and cools down for retry.rate_limit_cooldown.
  const config = join(scratch, "cooldown.yaml");
  writeFileSync(
    config,
    [
      "rate_limit: { requests_per_minute: 12, burst: 1 }",
      "retry: { queue_timeout: 1s, rate_limit_cooldown: 60s }",
      "keys:",
      `  - { key: "${testKey()}", name: "interactive" }`,
      `  - { key: "${testKey()}", name: "batch-jobs" }`,
      `  - { key: "${testKey()}", name: "spare", requests_per_minute: 600, burst: 20 }`,
      "",
    ].join("\n"),
  );
  const server = await startServer(config);
  try {
    const { base } = server;
    const page = await (await browser()).newPage();
    const problems = [];
    watchPage(page, problems);
    await page.goto(`${base}/dashboard`);
    await page.waitForSelector("#key-rows tr[data-key]", { timeout: 10_000 });

    let cooling = null;
    for (let i = 0; i < 30 && !cooling; i++) {
      await chat(base, null, { allow: [200, 429] });
      cooling = (await stats(base)).keys.find((k) => k.state === "cooling_down");
      await sleep(120);
    }
    assert.ok(cooling, "a key cooled down after the simulator's 429");
    assert.equal(cooling.name, "spare");
    assert.equal(cooling.cooldown_reason, "rate_limited");
    await sleep(1500); // one more history sample, for the sparkline
    await waitForMatch(page, base);
    const row = page.locator(`#key-rows tr[data-state="cooling_down"]`);
    assert.equal(await row.count(), 1);
    assert.equal(await row.getAttribute("data-key"), cooling.key);
    const detail = await row.locator('[data-field="cooldown"]').textContent();
    assert.match(detail, /^\d+ s left · rate_limited$/, "time left and reason");
    assert.equal(await row.locator(".state-cooling_down").count(), 1, "coloured as cooling down");
    assert.ok(Number(await row.locator('td[data-field="rate_limited"]').textContent()) >= 1);

    mkdirSync(dirname(SCREENSHOT), { recursive: true });
    const bottom = await page.evaluate(() => document.getElementById("dashboard").getBoundingClientRect().bottom);
    await page.screenshot({ path: SCREENSHOT, clip: { x: 0, y: 0, width: 1440, height: Math.ceil(bottom) + 24 } });
    // The client that got the 429 (queue timeout) shows up as a failed fetch only in Node, not the page.
    assert.deepEqual(problems, [], "no console errors or CSP violations");
    await page.close();
  } finally {
    await stopServer(server.child);
  }
});

test("with auth.tokens the page asks for a token and keeps it for the tab", { timeout: 30_000 }, async () => {
  const token = `browser-${randomBytes(12).toString("hex")}`;
  const config = join(scratch, "auth.yaml");
  writeFileSync(
    config,
    [
      "auth:",
      `  tokens: ["${token}"]`,
      "keys:",
      `  - { key: "${testKey()}", name: "team-a" }`,
      `  - { key: "${testKey()}", name: "batch-jobs" }`,
      "",
    ].join("\n"),
  );
  const server = await startServer(config);
  try {
    const { base } = server;
    const denied = await fetch(`${base}/stats`);
    assert.equal(denied.status, 401, "/stats needs the token");
    await traffic(base, 4, { token });

    const page = await (await browser()).newPage();
    const problems = [];
    watchPage(page, problems);
    await page.goto(`${base}/dashboard`);
    await page.waitForSelector("#token-input", { state: "visible", timeout: 10_000 });
    assert.equal(await page.getAttribute("#token-input", "type"), "password");
    assert.equal(await page.getAttribute("body", "data-state"), "auth");
    assert.equal(await page.locator("#key-rows tr[data-key]").count(), 0);

    // A wrong token is refused and not kept.
    await page.fill("#token-input", "not-the-token");
    await page.click("#token-submit");
    await page.waitForFunction(() => document.getElementById("token-error").textContent.length > 0, null, {
      timeout: 10_000,
    });
    assert.equal(await page.evaluate(() => sessionStorage.getItem("proxypal.dashboard.token")), null);

    await page.fill("#token-input", token);
    await page.click("#token-submit");
    await page.waitForSelector("#key-rows tr[data-key]", { timeout: 10_000 });
    const s = await waitForMatch(page, base, token);
    assert.deepEqual(
      s.keys.map((k) => k.name),
      ["team-a", "batch-jobs"],
    );
    assert.ok(!page.url().includes(token), "the token is never in the URL");
    assert.equal(await page.evaluate(() => sessionStorage.getItem("proxypal.dashboard.token")), token);
    assert.equal(await page.evaluate(() => localStorage.length), 0, "nothing in localStorage");

    // Same tab, reloaded: the token is still there, no prompt.
    await page.reload();
    await page.waitForSelector("#key-rows tr[data-key]", { timeout: 10_000 });
    assert.equal(await page.isVisible("#token-input"), false);
    await traffic(base, 2, { token });
    const later = await waitForMatch(page, base, token);
    assert.equal(later.totals.requests, 6);

    // The wrong-token attempt logs a 401 in the console; nothing else may.
    const unexpected = problems.filter((p) => !/401/.test(p));
    assert.deepEqual(unexpected, [], "no console errors or CSP violations");
    await page.close();
  } finally {
    await stopServer(server.child);
  }
});
