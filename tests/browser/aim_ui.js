// Opens one run's Metrics tab in the Aim UI with headless Chromium and checks what a person
// would look for: the run's hash, and a drawn `loss` curve for each subset (train, val).
//   node tests/browser/aim_ui.js <aim url> <run hash> <screenshot.png>
// Exits 0 when every check passes, 1 (after saving what the page showed) when one fails.
const { chromium } = require('playwright-core');

const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];
const TIMEOUT_MS = 30000;
const SUBSETS = ['train', 'val'];  // train.py tracks `loss` in these two contexts

async function checkRunPage(page, url, runHash) {
  await page.goto(`${url}/runs/${runHash}/metrics`);
  // visible: the document's <title> names the run too, the page's header must show it.
  await page.getByText(runHash).filter({ visible: true }).first().waitFor({ timeout: TIMEOUT_MS })
    .catch(() => { throw new Error(`the run ${runHash} is not shown`); });
  for (const subset of SUBSETS) {
    // One card per metric and context (Aim 3.29's class): the chart, its title and context.
    const card = page.locator('.RunDetailMetricsTab__container__chartContainer')
      .filter({ has: page.getByRole('heading', { name: 'loss', exact: true }) })
      .filter({ hasText: `subset="${subset}"` }).first();
    await card.waitFor({ timeout: TIMEOUT_MS })
      .catch(() => { throw new Error(`no \`loss\` chart for subset="${subset}"`); });
    await card.scrollIntoViewIfNeeded();  // charts render only once on screen
    // A drawn curve: a path with at least one line segment ("M x,y L x,y ...").
    await card.locator('svg path[d*="L"]').first().waitFor({ timeout: TIMEOUT_MS })
      .catch(() => { throw new Error(`the \`loss\` chart for subset="${subset}" has no curve`); });
  }
}

async function main() {
  const [url, runHash, screenshot] = process.argv.slice(2);
  if (!screenshot) {
    console.error('usage: node aim_ui.js <aim url> <run hash> <screenshot.png>');
    return 2;
  }
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true,
                                          args: CHROMIUM_ARGS });
  try {
    // Tall enough that every chart of a small run is on screen in one screenshot: the page
    // scrolls inside a panel, so fullPage alone captures only the viewport.
    const page = await browser.newPage({ viewport: { width: 1400, height: 2600 } });
    // The UI also asks a CDN (pyodide) and analytics; answer those at once instead of waiting.
    const origin = new URL(url).origin;
    await page.route('**/*', (route) =>
      route.request().url().startsWith(origin) ? route.continue() : route.abort());
    let failure = null;
    await checkRunPage(page, url, runHash).catch((e) => { failure = e; });
    await page.screenshot({ path: screenshot, fullPage: true });
    if (failure) {
      console.error(`aim_ui.js: ${url}/runs/${runHash}/metrics: ${failure.message} ` +
                    `(screenshot: ${screenshot})`);
      return 1;
    }
    console.log(`aim_ui.js: run ${runHash} and its loss curves are shown; ${screenshot}`);
    return 0;
  } finally {
    await browser.close();
  }
}

main().then((code) => process.exit(code),
            (e) => { console.error(`aim_ui.js: ${e.stack || e}`); process.exit(1); });
