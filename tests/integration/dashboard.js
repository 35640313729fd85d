// Drives the dashboard in headless Chromium for the dashboard test, through
// playwright-core (which downloads no browser: it runs the system's).
//
//   node dashboard.js URL        then commands on stdin, one per line:
//   expect {"view": {"rows": N, "covered": M}, …}   wait until the page shows them
//   shot PATH WIDTH HEIGHT                           screenshot at that viewport
//   check                                            {"reloaded", "outside", "overflow"}
//   gone VIEW                                        wait until the page shows no card of VIEW
//   quit
//
// Each command answers one line on stdout: "ok …" or "fail …".

const path = require("path");
const readline = require("readline");
const modules = process.env.LAMBDAFLOW_PLAYWRIGHT || path.join(process.env.HOME, ".cache/playwright/node_modules");
const { chromium } = require(path.join(modules, "playwright-core"));

async function main() {
  const url = process.argv[2];
  const browser = await chromium.launch({
    executablePath: process.env.LAMBDAFLOW_CHROMIUM || "/usr/bin/chromium",
    // This machine's network is closed: no background or update traffic.
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const origin = new URL(url).origin;
  const outside = [];
  page.on("request", (r) => { if (!r.url().startsWith(origin) && !r.url().startsWith("data:")) outside.push(r.url()); });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  const loadedAt = await page.evaluate(() => window.lambdaflowLoadedAt);

  const shown = () => page.evaluate(() => {
    const out = {};
    for (const s of document.querySelectorAll("section.view")) {
      out[s.dataset.view] = {
        rows: Number(s.querySelector(".rows").dataset.rows),
        covered: Number(s.dataset.covered),
      };
    }
    return out;
  });

  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    const [cmd, ...rest] = line.split(" ");
    try {
      if (cmd === "expect") {
        const want = JSON.parse(rest.join(" "));
        const t = Date.now();
        let got = {};
        for (;;) {
          got = await shown();
          const same = Object.keys(want).every((v) => got[v] && got[v].rows === want[v].rows && got[v].covered === want[v].covered);
          if (same) { console.log("ok " + JSON.stringify(got)); break; }
          if (Date.now() - t > 30000) { console.log("fail " + JSON.stringify({ got, errors })); break; }
          await new Promise((r) => setTimeout(r, 200));
        }
      } else if (cmd === "gone") {
        const view = rest.join(" ");
        const t = Date.now();
        for (;;) {
          const got = await shown();
          if (!(view in got)) { console.log("ok " + JSON.stringify(got)); break; }
          if (Date.now() - t > 30000) { console.log("fail still shown after 30 s: " + JSON.stringify({ got, errors })); break; }
          await new Promise((r) => setTimeout(r, 200));
        }
      } else if (cmd === "shot") {
        const [file, w, h] = rest;
        await page.setViewportSize({ width: Number(w), height: Number(h) });
        await new Promise((r) => setTimeout(r, 1500));
        await page.screenshot({ path: file, fullPage: false });
        console.log("ok " + file);
      } else if (cmd === "check") {
        const now = await page.evaluate(() => window.lambdaflowLoadedAt);
        const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
        const state = await page.evaluate(() => document.getElementById("state").textContent);
        const charts = await page.evaluate(() => document.querySelectorAll("section.view .chart svg").length);
        const tables = await page.evaluate(() => document.querySelectorAll("section.view table tr").length);
        console.log("ok " + JSON.stringify({ reloaded: now !== loadedAt, outside, overflow, errors, state, charts, tables }));
      } else if (cmd === "quit") {
        break;
      } else {
        console.log("fail unknown command " + cmd);
      }
    } catch (e) {
      console.log("fail " + String(e).replace(/\n/g, " "));
    }
  }
  await browser.close();
}

main().catch((e) => { console.log("fail " + String(e).replace(/\n/g, " ")); process.exit(1); });
