// Drives GET /dashboard in Debian's headless chromium (playwright-core, no
// downloaded browser) against `proxypal-server --dev` (the simulated NVIDIA
// upstream): rows and counts match /stats and follow new traffic, the
// sparklines draw, the usage charts and today's budget show the ledger's and
// the quotas' numbers, the response cache's hit rate shows (and hides when
// the cache is off), and with auth.tokens set the page asks for a token.
//
// Run with tests/browser/run.sh (installs chromium and playwright-core, builds
// the server). Env: PROXYPAL_BIN (default target/debug/proxypal-server),
// CHROMIUM (default /usr/bin/chromium), SCREENSHOT (default docs/img/dashboard.png),
// USAGE_SCREENSHOT (default /tmp/dashboard-usage.png: the whole page with usage).

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
const USAGE_SCREENSHOT = process.env.USAGE_SCREENSHOT || "/tmp/dashboard-usage.png";
const TOTAL_TIMEOUT_MS = 90_000;
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

/**
 * One chat completion through the proxy. `--dev` turns the response cache on, and these tests
 * repeat one request to count keys, quotas and 429s: unless `cache` is set, the request says
 * `Cache-Control: no-store` and goes upstream every time. Resolves to the status, or with
 * `full` to `{ status, cache }` (the `x-proxypal-cache` header).
 */
async function chat(base, token, { allow = [200], model = MODEL, cache = false, temperature, full = false } = {}) {
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = `Bearer ${token}`;
  if (!cache) headers["cache-control"] = "no-store";
  const body = { model, messages: [{ role: "user", content: "Hello" }] };
  if (temperature !== undefined) body.temperature = temperature;
  const r = await fetch(`${base}/v1/chat/completions`, {
    method: "POST",
    headers,
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  await r.arrayBuffer();
  assert.ok(allow.includes(r.status), `chat completion through the proxy answered ${r.status}`);
  return full ? { status: r.status, cache: r.headers.get("x-proxypal-cache") } : r.status;
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
    if (m.type() === "error") problems.push(`console: ${m.text()} (${m.location().url})`);
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
    // The keys table (the usage section below it is in USAGE_SCREENSHOT).
    const bottom = await page.evaluate(() => document.getElementById("keys").getBoundingClientRect().bottom);
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
      "ledger: { enabled: false }",
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

    // No ledger here: /usage says ledger_disabled and the usage section gives way to a one-line note.
    await page.waitForSelector("#usage-off", { state: "visible", timeout: 10_000 });
    assert.equal(await page.isVisible("#usage"), false, "no usage section without a ledger");
    assert.equal(later.ledger, null);
    assert.equal(await page.isVisible("#budget-keys"), true, "the budget still shows");

    // The wrong-token attempt logs a 401 in the console, /usage a 404; nothing else may.
    const unexpected = problems.filter((p) => !/401/.test(p) && !/404.*\/usage\?/.test(p));
    assert.deepEqual(unexpected, [], "no console errors or CSP violations");
    await page.close();
  } finally {
    await stopServer(server.child);
  }
});

test("usage charts, totals and today's budget follow the ledger and the quotas", { timeout: 45_000 }, async () => {
  // Named clients (so /stats and /usage need a token: the page uses the admin's),
  // daily quotas for the budget, and bob's per-minute quota refuses his third request.
  const tok = (name) => `${name}-${randomBytes(12).toString("hex")}`;
  const t = { alice: tok("alice"), bob: tok("bob"), ops: tok("ops") };
  const config = join(scratch, "clients.yaml");
  writeFileSync(
    config,
    [
      "clients:",
      `  - { name: alice, token: "${t.alice}", requests_per_day: 100, tokens_per_day: 20000 }`,
      `  - { name: bob, token: "${t.bob}", requests_per_day: 40, requests_per_minute: 2 }`,
      `  - { name: ops, token: "${t.ops}", admin: true }`,
      "",
    ].join("\n"),
  );
  const server = await startServer(config);
  try {
    const { base } = server;
    await traffic(base, 5, { token: t.alice });
    // The alias spends groq's budget first: its key has a daily window (1000 requests per day).
    for (let i = 0; i < 3; i++) await chat(base, t.bob, { model: "llama-70b", allow: [200, 429] });
    const usage = async (q) => {
      const r = await fetch(`${base}/usage?${q}`, { headers: { authorization: `Bearer ${t.ops}` } });
      assert.equal(r.status, 200, "/usage");
      return (await r.json()).rows;
    };
    // The ledger writes in batches: wait until all eight are in.
    const deadline = Date.now() + 10_000;
    let s;
    for (;;) {
      s = await stats(base, t.ops);
      if ((s.ledger.written >= 8 && s.ledger.pending === 0) || Date.now() > deadline) break;
      await sleep(100);
    }
    assert.equal(s.ledger.written, 8, "the ledger holds every request");
    assert.equal(s.clients.find((c) => c.name === "bob").refused, 1, "bob's third request was refused");
    const byClient = await usage("group_by=client&bucket=none");
    const tokensOf = (name) => byClient.find((r) => r.client === name).total_tokens;

    const page = await (await browser()).newPage();
    await page.setViewportSize({ width: 1440, height: 900 });
    const problems = [];
    watchPage(page, problems);
    const usageRequests = [];
    page.on("request", (r) => {
      if (new URL(r.url()).pathname === "/usage") usageRequests.push(new URL(r.url()).searchParams);
    });
    await page.goto(`${base}/dashboard`);
    await page.fill("#token-input", t.ops);
    await page.click("#token-submit");
    const opened = Date.now();
    await page.waitForSelector('#usage svg[data-chart="client-requests"] g[data-series] rect', { timeout: 10_000 });
    for (const p of usageRequests) {
      assert.equal(p.get("bucket"), "hour");
      assert.ok(Math.abs(Number(p.get("from")) - (Date.now() / 1000 - 86_400)) < 60, "from = now − 24 h");
    }
    assert.deepEqual(usageRequests.map((p) => p.get("group_by")).sort(), ["client", "model"]);

    // Four charts, each with a series, a legend colour and an accessible summary.
    const charts = await page.$$eval("#usage svg[data-chart]", (svgs) =>
      svgs.map((svg) => ({
        chart: svg.dataset.chart,
        series: [...svg.querySelectorAll("g[data-series]")].map((g) => g.dataset.series),
        rects: svg.querySelectorAll("rect").length,
        label: svg.getAttribute("aria-label"),
        title: svg.querySelector(":scope > title")?.textContent,
      })),
    );
    assert.deepEqual(
      charts.map((c) => c.chart),
      ["client-requests", "client-tokens", "model-requests", "model-tokens"],
    );
    for (const c of charts) {
      assert.ok(c.series.length >= 1 && c.rects >= 1, `${c.chart} draws a series: ${JSON.stringify(c)}`);
      assert.equal(c.title, c.label, `${c.chart} has a <title>`);
    }
    assert.deepEqual(charts[0].series.sort(), ["alice", "bob"]);
    assert.match(charts[0].label, /^requests per hour by client, last 24 h: alice 5, bob 3$/);
    assert.deepEqual(charts[2].series.sort(), ["llama-70b", MODEL].sort());

    // The totals tables (legend and text fallback) hold what was sent.
    const totals = (id) =>
      page.$$eval(`#${id} tbody tr[data-name]`, (trs) =>
        trs.map((tr) => {
          const f = (n) => tr.querySelector(`td[data-field="${n}"]`);
          return {
            name: tr.dataset.name,
            requests: Number(f("requests").textContent),
            errors: Number(f("errors").textContent),
            tokens: f("tokens").title.split(" ")[0],
            swatch: !!f("name").querySelector(".swatch"),
          };
        }),
      );
    assert.deepEqual(await totals("client-totals"), [
      { name: "alice", requests: 5, errors: 0, tokens: String(tokensOf("alice")), swatch: true },
      { name: "bob", requests: 3, errors: 1, tokens: String(tokensOf("bob")), swatch: true },
    ]);
    assert.deepEqual(
      (await totals("model-totals")).map((r) => [r.name, r.requests]),
      [
        [MODEL, 5],
        ["llama-70b", 3],
      ],
    );
    assert.ok(tokensOf("alice") > 0, "the simulator reports usage");

    // Ledger line from /stats.
    const line = page.locator("#ledger-line");
    assert.match(await line.textContent(), /^ledger sqlite · up · 0 pending · 0 dropped$/);
    assert.equal(await line.evaluate((el) => el.classList.contains("warn")), false);

    // Today's budget: every key (masked label), its daily windows; the clients' windows and counts.
    const budgetKeys = await page.$$eval("#budget-keys tbody tr", (trs) =>
      trs.map((tr) => ({
        key: tr.dataset.key,
        bars: [...tr.querySelectorAll(".bar")].map((b) => [
          b.getAttribute("aria-label"),
          Number(b.getAttribute("aria-valuenow")),
          Number(b.getAttribute("aria-valuemax")),
        ]),
        none: tr.querySelector('[data-field="no-limits"]')?.textContent ?? null,
      })),
    );
    assert.deepEqual(
      budgetKeys.map((k) => k.key),
      s.keys.map((k) => k.key),
      "the budget lists every key",
    );
    for (const k of budgetKeys) assert.match(k.key, /^nvapi-…\w{4}$/, "keys stay masked");
    const groq = s.keys.findIndex((k) => k.provider === "groq");
    const groqDay = s.keys[groq].limits.find((l) => l.period_seconds === 86400);
    assert.deepEqual(budgetKeys[groq].bars, [["requests/day", groqDay.used, groqDay.limit]]);
    assert.ok(groqDay.used >= 1, "bob's requests went to groq");
    for (const k of budgetKeys.filter((_, i) => i !== groq)) assert.equal(k.none, "no daily limit");

    const budgetClients = await page.$$eval("#budget-clients tbody tr", (trs) =>
      trs.map((tr) => ({
        client: tr.dataset.client,
        bars: [...tr.querySelectorAll(".bar")].map((b) => [
          b.getAttribute("aria-label"),
          Number(b.getAttribute("aria-valuenow")),
          Number(b.getAttribute("aria-valuemax")),
        ]),
        queued: tr.querySelector('td[data-field="queued"]').textContent,
        refused: tr.querySelector('td[data-field="refused"]').textContent,
      })),
    );
    const aliceTokens = s.clients.find((c) => c.name === "alice").limits.find((l) => l.kind === "tokens").used;
    assert.deepEqual(budgetClients, [
      {
        client: "alice",
        bars: [
          ["requests/day", 5, 100],
          ["tokens/day", aliceTokens, 20000],
        ],
        queued: "0",
        refused: "0",
      },
      { client: "bob", bars: [["requests/day", 2, 40]], queued: "0", refused: "1" },
      { client: "ops", bars: [], queued: "0", refused: "0" },
    ]);

    await page.screenshot({ path: USAGE_SCREENSHOT, fullPage: true });

    // New traffic shows up with the next /usage refresh (every 10 s, not more often).
    await traffic(base, 2, { token: t.alice });
    await page.waitForFunction(
      () => document.querySelector('#client-totals tr[data-name="alice"] td[data-field="requests"]')?.textContent === "7",
      null,
      { timeout: 15_000 },
    );
    const seconds = (Date.now() - opened) / 1000;
    assert.ok(
      usageRequests.length <= 2 * (Math.floor(seconds / 10) + 1),
      `/usage asked ${usageRequests.length} times in ${seconds.toFixed(1)} s`,
    );

    // The first /stats, before the token was entered, answered 401; nothing else may log an error.
    const unexpected = problems.filter((p) => !/401.*\/stats\)$/.test(p));
    assert.deepEqual(unexpected, [], "no console errors or CSP violations");
    await page.close();

    // The ledger's database away (played by the browser: a real one is needed to start): /usage
    // answers 503 ledger_unavailable and /stats says down with drops. A notice, no charts, a red line.
    const down = await (await browser()).newPage();
    await down.addInitScript((token) => sessionStorage.setItem("proxypal.dashboard.token", token), t.ops);
    await down.route("**/usage?*", (route) =>
      route.fulfill({
        status: 503,
        contentType: "application/json",
        body: JSON.stringify({ error: { code: "ledger_unavailable", message: "the usage ledger cannot be read now" } }),
      }),
    );
    await down.route("**/stats", async (route) => {
      const body = await (await route.fetch()).json();
      body.ledger = { ...body.ledger, up: false, pending: 12, dropped: 3 };
      await route.fulfill({ json: body });
    });
    await down.goto(`${base}/dashboard`);
    await down.waitForSelector("#usage-notice", { state: "visible", timeout: 10_000 });
    assert.match(await down.textContent("#usage-notice"), /cannot be read right now/);
    assert.equal(await down.isVisible("#usage-body"), false, "no broken charts");
    assert.match(await down.textContent("#ledger-line"), /^ledger sqlite · down · 12 pending · 3 dropped$/);
    assert.equal(await down.locator("#ledger-line.warn").count(), 1, "warn styling");
    assert.equal(await down.isVisible("#budget-keys"), true, "the budget still shows");
    await down.close();
  } finally {
    await stopServer(server.child);
  }
});

test("the response cache's hit rate, requests saved, size and backend follow /stats", { timeout: 30_000 }, async () => {
  // --dev turns the memory cache on. A named client (so /stats needs the admin's token), and the
  // same temperature-0 chat completion sent twice: a miss, then a hit that saves one upstream request.
  const tok = (name) => `${name}-${randomBytes(12).toString("hex")}`;
  const t = { alice: tok("alice"), ops: tok("ops") };
  const config = join(scratch, "cache.yaml");
  writeFileSync(
    config,
    ["clients:", `  - { name: alice, token: "${t.alice}" }`, `  - { name: ops, token: "${t.ops}", admin: true }`, ""].join(
      "\n",
    ),
  );
  const server = await startServer(config);
  try {
    const { base } = server;
    assert.match(server.output(), /Response cache: on \(memory, entries live 1h\)/, "the --dev banner says the cache is on");
    assert.match(server.output(), /x-proxypal-cache: hit/);

    const page = await (await browser()).newPage();
    const problems = [];
    watchPage(page, problems);
    await page.addInitScript((token) => sessionStorage.setItem("proxypal.dashboard.token", token), t.ops);
    await page.goto(`${base}/dashboard`);
    await page.waitForSelector("#key-rows tr[data-key]", { timeout: 10_000 });
    // Present (the test fails here when the element is missing) and visible, before any lookup.
    await page.waitForSelector("#cache-hit-rate", { state: "visible", timeout: 10_000 });
    assert.equal(await page.isVisible("#cache"), true, "the cache section shows while the cache is on");
    assert.equal(await page.textContent("#cache-hit-rate"), "no lookups yet");
    assert.equal(await page.textContent("#cache-saved"), "0");
    assert.match(await page.textContent("#cache-line"), /^cache memory · ready · 0 stored$/);

    const first = await chat(base, t.alice, { cache: true, temperature: 0, full: true });
    const second = await chat(base, t.alice, { cache: true, temperature: 0, full: true });
    assert.deepEqual([first.cache, second.cache], ["miss", "hit"], "x-proxypal-cache: a miss, then a hit");
    const s = await stats(base, t.ops);
    assert.equal(s.cache.hits, 1);
    assert.equal(s.cache.misses, 1);
    assert.equal(s.cache.saved_requests, 1);
    assert.equal(s.cache.entries, 1);
    assert.ok(s.cache.bytes > 0, "the entry has a size");
    assert.equal(s.totals.requests, 1, "the hit spent no key");

    await page.waitForFunction(() => document.getElementById("cache-hit-rate")?.textContent === "50 %", null, {
      timeout: 10_000,
    });
    assert.equal(await page.textContent("#cache-saved"), "1", "one upstream request saved");
    assert.equal(await page.textContent("#cache-lookups"), "1 hit · 1 miss · 0 bypassed");
    assert.equal(await page.textContent("#cache-entries"), "1");
    assert.match(await page.textContent("#cache-bytes"), /^\d+(\.\d)? (B|KiB)$/, "the size in human units");
    assert.equal(await page.getAttribute("#cache-hit-bar", "aria-valuenow"), "50.0");
    assert.equal(await page.getAttribute("#cache-hit-bar", "role"), "meter");
    assert.match(await page.textContent("#cache-line"), /^cache memory · ready · 1 stored$/);
    assert.equal(await page.locator("#cache-line.warn").count(), 0, "no warning for a ready memory cache");

    // Bypasses are not in the rate.
    await chat(base, t.alice, { temperature: 0 });
    await page.waitForFunction(() => /1 bypassed$/.test(document.getElementById("cache-lookups").textContent), null, {
      timeout: 10_000,
    });
    assert.equal(await page.textContent("#cache-hit-rate"), "50 %");
    assert.deepEqual(problems, [], "no console errors or CSP violations");
    await page.close();

    // A Redis cache not connected yet, with failed calls: figures it cannot count are dashes, the line warns.
    const redis = await (await browser()).newPage();
    const redisProblems = [];
    watchPage(redis, redisProblems);
    await redis.addInitScript((token) => sessionStorage.setItem("proxypal.dashboard.token", token), t.ops);
    await redis.route("**/stats", async (route) => {
      const body = await (await route.fetch()).json();
      body.cache = { ...body.cache, backend: "redis", ready: false, redis_errors: 2, entries: 0, bytes: 0 };
      await route.fulfill({ json: body });
    });
    await redis.goto(`${base}/dashboard`);
    await redis.waitForSelector("#cache-line.warn", { timeout: 10_000 });
    assert.equal(await redis.textContent("#cache-line"), "cache redis · not connected · 1 stored · 2 Redis errors");
    assert.equal(await redis.getAttribute("#cache", "data-state"), "warn");
    assert.equal(await redis.textContent("#cache-entries"), "—");
    assert.equal(await redis.textContent("#cache-bytes"), "—");
    assert.equal(await redis.textContent("#cache-hit-rate"), "50 %");
    assert.deepEqual(redisProblems, [], "no console errors or CSP violations");
    await redis.close();

    // The cache off: /stats has `cache: null` (absent, or `enabled: false`, the same): nothing shows, no error.
    for (const off of [(b) => (b.cache = null), (b) => delete b.cache, (b) => (b.cache = { enabled: false })]) {
      const none = await (await browser()).newPage();
      const noneProblems = [];
      watchPage(none, noneProblems);
      await none.addInitScript((token) => sessionStorage.setItem("proxypal.dashboard.token", token), t.ops);
      await none.route("**/stats", async (route) => {
        const body = await (await route.fetch()).json();
        off(body);
        await route.fulfill({ json: body });
      });
      await none.goto(`${base}/dashboard`);
      await none.waitForFunction(() => Number(document.getElementById("status").dataset.polls) >= 2, null, {
        timeout: 10_000,
      });
      assert.equal(await none.getAttribute("body", "data-state"), "ok");
      assert.equal(await none.isVisible("#cache"), false, "no cache section while the cache is off");
      assert.equal(await none.isVisible("#key-rows tr[data-key]"), true, "the rest of the page shows");
      assert.deepEqual(noneProblems, [], "no console errors or CSP violations");
      await none.close();
    }
  } finally {
    await stopServer(server.child);
  }
});
