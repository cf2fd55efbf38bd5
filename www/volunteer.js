// tabgrid compute worker (a DedicatedWorker started by app.js): loads the chosen
// WebAssembly bundle, starts its thread pool, and relays the volunteer's state to the page.
// The protocol, cache and kernels all live in the bundle; this file only wires messages.

let volunteer = null;
let pkg = null;
let pending = [];

function post(message) {
  self.postMessage(message);
}

async function start({ script, threaded, url, token, threads, duty, agent }) {
  pkg = await import(script);
  await pkg.default();
  if (threaded) {
    await pkg.initThreadPool(threads);
  }
  volunteer = new pkg.Volunteer(url, token, threaded ? threads : 1, agent, (state) =>
    post({ type: 'state', state }),
  );
  volunteer.setDuty(duty);
  post({ type: 'ready', info: pkg.bundleInfo() });
  volunteer.start();
  for (const message of pending) control(message);
  pending = [];
}

function control(message) {
  if (!volunteer) {
    pending.push(message);
    return;
  }
  switch (message.type) {
    case 'pause':
      volunteer.pause();
      break;
    case 'resume':
      volunteer.resume();
      break;
    case 'duty':
      volunteer.setDuty(message.percent);
      break;
    case 'stop':
      volunteer.stop();
      break;
    case 'bench':
      // The kernel alone, for `cargo xtask bench browser`.
      try {
        const gflops = pkg.bench(message.dtype, message.n, message.reps);
        post({ type: 'bench', id: message.id, gflops });
      } catch (err) {
        post({ type: 'bench', id: message.id, error: String(err?.message ?? err) });
      }
      break;
  }
}

self.onmessage = ({ data }) => {
  if (data.type === 'start') {
    start(data).catch((err) => post({ type: 'error', message: String(err?.message ?? err) }));
  } else {
    control(data);
  }
};
