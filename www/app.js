// tabgrid volunteer page: gets a token, starts the compute worker (volunteer.js) with the
// right bundle, and shows in plain words what the tab is doing. No bundler, no framework.

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const cores = navigator.hardwareConcurrency || 2;
const MAX_THREADS = Math.max(cores, 1);

// What tests and curious volunteers can read from the console: `tabgrid.state`.
const tabgrid = (window.tabgrid = {
  state: null,
  info: null,
  errors: [],
  bundle: null,
  // Milliseconds from opening the page to its first tile done.
  firstTileMs: null,
  // The kernel's GFLOP/s in this tab (`cargo xtask bench browser`).
  bench: (dtype, n, reps) =>
    new Promise((resolve, reject) => {
      const id = ++benchId;
      benches.set(id, { resolve, reject });
      worker.postMessage({ type: 'bench', id, dtype, n, reps });
    }),
});
const benches = new Map();
let benchId = 0;

let worker = null;
let token = null;
let paused = false;
let duty = chooseDuty();
let threads = chooseThreads();
let lastRefresh = 0;

function chooseThreads() {
  const asked = Number.parseInt(params.get('threads') ?? '', 10);
  const wanted = Number.isFinite(asked) && asked > 0 ? asked : Math.max(1, Math.floor(cores / 2));
  return Math.min(wanted, 64);
}

// `/?duty=25`: the CPU share to start with, 1..100 percent (the page offers 25/50/100).
function chooseDuty() {
  const asked = Number.parseInt(params.get('duty') ?? '', 10);
  return Number.isFinite(asked) ? Math.min(Math.max(asked, 1), 100) : 100;
}

function fail(headline, detail) {
  tabgrid.errors.push(`${headline}: ${detail}`);
  show({ phase: 'error', headline, detail });
}

function show({ phase, headline, detail }) {
  $('status').dataset.phase = phase;
  $('headline').textContent = headline;
  $('detail').textContent = detail;
}

function notice(text) {
  $('notice').hidden = !text;
  $('notice').textContent = text || '';
}

const HEADLINES = {
  connecting: 'Connecting…',
  connected: 'Computing for the grid',
  retrying: 'Connection lost — retrying',
  paused: 'Paused',
  stopped: 'Stopped',
};

function render(state) {
  tabgrid.state = state;
  if (state.tiles > 0 && tabgrid.firstTileMs === null) tabgrid.firstTileMs = performance.now();
  let headline = HEADLINES[state.phase] ?? state.phase;
  if (state.phase === 'connected' && state.leases === 0) headline = 'Connected — waiting for work';
  show({ phase: state.phase, headline, detail: state.detail });
  $('tiles').textContent = state.tiles.toLocaleString();
  $('gflops').textContent = state.gflops > 0 ? state.gflops.toFixed(1) : '–';
  $('threads-used').textContent = String(state.threads);
  $('duty-used').textContent = `${state.duty} %`;
  $('kernel').textContent = `Kernel: ${state.kernel}, ${state.threaded ? 'threaded' : 'single-threaded'} bundle.`;
  $('pause').disabled = state.phase === 'stopped' && !paused;
  $('pause').textContent = paused ? 'Resume' : 'Pause';
  if (state.phase === 'stopped' && state.detail.startsWith('refused') && !tokenFromUrl()) {
    refreshToken();
  }
}

function tokenFromUrl() {
  const hash = new URLSearchParams(location.hash.slice(1));
  return hash.get('token');
}

// Open mode: the coordinator hands out short-lived volunteer tokens. Token mode: the
// operator's link carries one in `#token=…`.
async function getToken() {
  const given = tokenFromUrl();
  if (given) return given;
  const response = await fetch('/api/v1/volunteers', { method: 'POST' });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const why = body.error ?? response.statusText;
    if (response.status === 403) {
      throw new Error(`this coordinator lends no tokens to anonymous tabs (${why}); open the link with #token=… that its operator gave you`);
    }
    throw new Error(`could not get a volunteer token: ${response.status} ${why}`);
  }
  return body.token;
}

// A refused token (expired while the tab was open) is replaced once a minute at most.
async function refreshToken() {
  if (Date.now() - lastRefresh < 60_000) return;
  lastRefresh = Date.now();
  try {
    token = await getToken();
    restart();
  } catch (err) {
    fail('Cannot join the grid', String(err.message ?? err));
  }
}

async function loadManifest() {
  const response = await fetch('pkg/manifest.json', { cache: 'no-cache' });
  if (!response.ok) {
    throw new Error('this coordinator has no browser bundle built; its operator must run `cargo xtask wasm` (or start it with `cargo xtask cluster`) and restart it');
  }
  return response.json();
}

// A module whose one function returns f32x4.relaxed_madd of three zero vectors: it
// validates only where the browser has relaxed-simd (and so the FMA the faster bundle uses).
function hasRelaxedSimd() {
  const zero = [0xfd, 0x0c, ...new Array(16).fill(0)];
  const body = [0x00, ...zero, ...zero, ...zero, 0xfd, 0x85, 0x02, 0x0b];
  return WebAssembly.validate(new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
    0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7b, // types: () -> v128
    0x03, 0x02, 0x01, 0x00, // one function of type 0
    0x0a, body.length + 2, 0x01, body.length, ...body, // its code
  ]));
}

function pickBundle(manifest) {
  if (self.crossOriginIsolated && manifest.bundles.threaded) {
    notice('');
    // `?simd=128` keeps the plain simd128 kernel (to compare the two).
    const plain = new URLSearchParams(location.search).get('simd') === '128';
    const relaxed = manifest.bundles['threaded-relaxed'];
    if (relaxed && !plain && hasRelaxedSimd()) {
      return { name: 'threaded-relaxed', threaded: true, ...relaxed };
    }
    return { name: 'threaded', threaded: true, ...manifest.bundles.threaded };
  }
  const why = !self.isSecureContext
    ? 'this page is not a secure context (plain http on an address other than localhost; the coordinator can serve https with --tls-cert/--tls-key)'
    : 'this page is not cross-origin isolated (the server did not send the COOP/COEP headers)';
  notice(`Computing on one thread only: ${why}. Browsers allow threads in WebAssembly only on isolated pages.`);
  threads = 1;
  return { name: 'single', threaded: false, ...manifest.bundles.single };
}

function socketUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/api/v1/worker`;
}

function start() {
  const bundle = tabgrid.bundle;
  worker = new Worker('volunteer.js', { type: 'module' });
  worker.onmessage = ({ data }) => {
    if (data.type === 'state') render(data.state);
    else if (data.type === 'ready') {
      tabgrid.info = data.info;
      $('pause').disabled = false;
    } else if (data.type === 'bench') {
      const waiting = benches.get(data.id);
      benches.delete(data.id);
      if (data.error) waiting?.reject(new Error(data.error));
      else waiting?.resolve(data.gflops);
    } else if (data.type === 'error') fail('The compute module failed', data.message);
  };
  worker.onerror = (event) => {
    event.preventDefault();
    fail('The compute worker failed', event.message || 'unknown error');
  };
  worker.postMessage({
    type: 'start',
    script: new URL(bundle.script, location.href).href,
    threaded: bundle.threaded,
    url: socketUrl(),
    token,
    threads,
    duty,
    agent: `tabgrid-page (${navigator.userAgent})`,
  });
}

// Threads are fixed when the pool starts, so a new count means a new worker; the old
// one closes its socket first so that its leases return at once.
function restart() {
  if (worker) {
    worker.postMessage({ type: 'stop' });
    const old = worker;
    setTimeout(() => old.terminate(), 250);
    worker = null;
  }
  paused = false;
  start();
}

function setUpControls() {
  const select = $('threads');
  const limit = tabgrid.bundle.threaded ? Math.max(MAX_THREADS, threads) : 1;
  for (let n = 1; n <= limit; n++) {
    const option = new Option(String(n), String(n), false, n === threads);
    select.add(option);
  }
  select.disabled = limit === 1;
  select.onchange = () => {
    threads = Number(select.value);
    const url = new URL(location.href);
    url.searchParams.set('threads', String(threads));
    history.replaceState(null, '', url);
    restart();
  };
  for (const radio of document.querySelectorAll('input[name=duty]')) {
    radio.checked = Number(radio.value) === duty;
    radio.onchange = () => {
      duty = Number(radio.value);
      worker?.postMessage({ type: 'duty', percent: duty });
    };
  }
  $('pause').onclick = () => {
    paused = !paused;
    worker?.postMessage({ type: paused ? 'pause' : 'resume' });
  };
  // Leaving: the socket closes with a reason so the coordinator reassigns at once.
  addEventListener('pagehide', () => worker?.postMessage({ type: 'stop' }));
}

async function main() {
  addEventListener('error', (event) => tabgrid.errors.push(String(event.message)));
  addEventListener('unhandledrejection', (event) => tabgrid.errors.push(String(event.reason)));
  try {
    const manifest = await loadManifest();
    tabgrid.bundle = pickBundle(manifest);
    token = await getToken();
  } catch (err) {
    fail('Cannot join the grid', String(err.message ?? err));
    return;
  }
  setUpControls();
  start();
}

main();
