// Opens visualize.py's page from the file system in headless Chromium, with every network
// request refused (the page must be self-contained), and checks what a reader would: the text
// is there, character for character, each coloured; hovering a character shows the five
// likeliest characters to follow it; the attention maps are drawn.
//   node tests/browser/visualize.js <page.html> <expected text file> <hover index> <screenshot.png>
// Exits 0 when every check passes, 1 (after saving what the page showed) when one fails.
const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];
const SHOWN = { '\n': '\u21b5\n', '\t': '\u2192\t' };  // as visualize.py's `shown`

async function checkPage(page, pageUrl, expected, hoverIndex, requests) {
  await page.goto(pageUrl);
  const spans = page.locator('#text span[data-i]');
  const count = await spans.count();
  if (count !== [...expected].length) {
    throw new Error(`${count} character spans, expected ${[...expected].length}`);
  }
  const shown = await page.locator('#text').innerText();
  const want = [...expected].map((c) => SHOWN[c] || c).join('');
  if (shown.replace(/\s+/g, ' ').trim() !== want.replace(/\s+/g, ' ').trim()) {
    throw new Error(`the text shown differs from the text: ${JSON.stringify(shown.slice(0, 80))}`);
  }
  const background = await spans.nth(hoverIndex).evaluate((el) => el.style.background);
  if (!background) throw new Error(`character ${hoverIndex} has no colour`);
  const tip = page.locator('#tip');
  if (await tip.isVisible()) throw new Error('the tooltip shows before any hover');
  await spans.nth(hoverIndex).hover();
  await tip.waitFor({ state: 'visible', timeout: 5000 })
    .catch(() => { throw new Error(`hovering character ${hoverIndex} shows no tooltip`); });
  const next = await tip.locator('.next').allInnerTexts();
  if (next.length !== 5) throw new Error(`the tooltip lists ${next.length} successors, not 5`);
  const probs = next.map((t) => parseFloat((t.match(/\d\.\d+/) || ['nan'])[0]));
  if (probs.some((p) => !(p >= 0 && p <= 1)) || probs.some((p, i) => i && p > probs[i - 1])) {
    throw new Error(`the successors' probabilities are not in decreasing order: ${next}`);
  }
  const img = page.locator('img[alt="attention maps"]');
  const width = await img.evaluate((el) => el.complete ? el.naturalWidth : 0);
  if (!width) throw new Error('the attention maps image is not drawn');
  if (requests.length) throw new Error(`the page asked the network: ${requests[0]}`);
  return next;
}

async function main() {
  const [pagePath, expectedPath, hoverArg, screenshot] = process.argv.slice(2);
  if (!screenshot) {
    console.error('usage: node visualize.js <page.html> <expected text> <hover index> <png>');
    return 2;
  }
  const expected = fs.readFileSync(expectedPath, 'utf8');
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true,
                                          args: CHROMIUM_ARGS });
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
    const requests = [];
    await page.route('**/*', (route) => {
      const url = route.request().url();
      if (url.startsWith('file:') || url.startsWith('data:')) return route.continue();
      requests.push(url);
      return route.abort();
    });
    const pageUrl = 'file://' + path.resolve(pagePath);
    let failure = null;
    let next = null;
    next = await checkPage(page, pageUrl, expected, +hoverArg, requests)
      .catch((e) => { failure = e; });
    await page.screenshot({ path: screenshot });
    if (failure) {
      console.error(`visualize.js: ${pagePath}: ${failure.message} (screenshot: ${screenshot})`);
      return 1;
    }
    console.log(`visualize.js: text shown, hover lists ${JSON.stringify(next)}; ${screenshot}`);
    return 0;
  } finally {
    await browser.close();
  }
}

main().then((code) => process.exit(code), (e) => { console.error(e); process.exit(1); });
