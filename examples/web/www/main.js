// The page's logic: load a GGUF model into Ember (wasm32 + WebGPU), stream generations,
// train a LoRA adapter. With `?run=1` in the URL it also runs one scripted pass (load,
// generate, train, ask again) and leaves the results in `window.emberRun` for the
// end-to-end test (scripts/test-web.sh); the query's other keys set that pass's inputs.
import init, { EmberEngine } from './pkg/ember_web.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let engine = null;
let busy = false;
// What the browser says of its WebGPU adapter (wgpu on the web does not get the name).
let gpuInfo = {};

function status(text, isError = false) {
  $('status').textContent = text;
  $('status').className = isError ? 'error' : '';
}

function setBusy(b) {
  busy = b;
  for (const id of ['generate', 'train', 'forget', 'selfcheck']) $(id).disabled = b || !engine;
  $('clear').disabled = b;
  $('load-url').disabled = b;
  $('file').disabled = b;
}

async function loadModel(bytes, name) {
  setBusy(true);
  engine = null;
  status(`Loading ${name} (${(bytes.length / 1048576).toFixed(1)} MB)…`);
  const t0 = performance.now();
  try {
    engine = await EmberEngine.load(bytes, name, (f) => status(`Loading ${name}: ${Math.round(f * 100)}%`));
  } finally {
    setBusy(false);
  }
  const info = JSON.parse(engine.info());
  info.gpu = gpuInfo;
  status(`Loaded ${info.model} in ${((performance.now() - t0) / 1000).toFixed(1)} s.`);
  $('device').textContent =
    `GPU: ${[gpuInfo.vendor, gpuInfo.architecture, gpuInfo.description].filter(Boolean).join(' ') || 'unnamed'}` +
    `${gpuInfo.isFallbackAdapter ? ' (fallback adapter)' : ''} via ${info.backend}, kernels: ${info.variant}, ` +
    `f16: ${info.f16}, subgroups: ${info.subgroups}\nmodel: ${info.model}, ` +
    `${(info.params / 1e6).toFixed(1)}M parameters, ${info.weights_mb.toFixed(1)} MB of weights, context ${info.n_ctx}`;
  setBusy(false);
  return info;
}

async function fetchBytes(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
}

async function generate({ prompt, maxTokens, chat, temperature, useAdapter }) {
  setBusy(true);
  // Each generation is a new turn of the transcript, so before and after training show together.
  const out = document.createElement('div');
  out.className = 'turn';
  $('output').appendChild(out);
  const shown = document.createElement('span');
  shown.className = 'prompt';
  shown.textContent = chat ? `Q: ${prompt}\nA: ` : prompt;
  out.appendChild(shown);
  const text = document.createTextNode('');
  out.appendChild(text);
  status('Generating…');
  try {
    const r = JSON.parse(await engine.generate(prompt, maxTokens, chat, temperature, useAdapter,
      (piece) => { text.data += piece; }));
    const tag = document.createElement('span');
    tag.className = 'stats';
    tag.textContent = r.adapter ? '  [with the adapter]' : '  [base model]';
    out.appendChild(tag);
    $('gen-stats').textContent =
      `${r.tokens.length} tokens, stop: ${r.stop}${r.adapter ? ', with the adapter' : ''}; ` +
      `prefill ${r.prefill_tok_s.toFixed(1)} tok/s, decode ${r.decode_tok_s.toFixed(2)} tok/s`;
    status('Done.');
    return r;
  } finally {
    setBusy(false);
  }
}

async function train({ jsonl, steps, batch, lr, rank, seq, seed }) {
  setBusy(true);
  const log = $('losses');
  log.textContent = '';
  status(`Training ${steps} steps…`);
  try {
    const r = JSON.parse(await engine.train(jsonl, steps, batch, lr, rank, seq, seed, (s) => {
      const st = JSON.parse(s);
      log.textContent += `step ${st.step}: loss ${st.loss.toFixed(4)}, grad norm ${st.grad_norm.toFixed(3)}, ${st.secs.toFixed(1)} s\n`;
      status(`Training: step ${st.step} of ${steps}…`);
    }));
    status(`Trained on ${r.examples} examples in ${r.secs.toFixed(1)} s; the adapter is on.`);
    return r;
  } finally {
    setBusy(false);
  }
}

async function selfcheck() {
  setBusy(true);
  status('Checking every kernel family against its CPU reference…');
  try {
    const r = JSON.parse(await engine.selfcheck());
    const bad = r.checks.filter((c) => !c.ok);
    $('selfcheck-result').textContent = bad.length === 0
      ? `all ${r.checks.length} kernel checks within tolerance`
      : `${bad.length} of ${r.checks.length} kernel checks FAILED: ` + bad.map((c) => `${c.kernel} (${c.variant}): ${c.max_error}`).join('; ');
    status('Done.');
    return r;
  } finally {
    setBusy(false);
  }
}

function formInputs() {
  return {
    prompt: $('prompt').value,
    maxTokens: Number($('max-tokens').value),
    chat: $('chat').checked,
    temperature: Number($('temperature').value),
    useAdapter: $('use-adapter').checked,
  };
}

function trainInputs() {
  return {
    jsonl: $('data').value,
    steps: Number($('steps').value),
    batch: Number($('batch').value),
    lr: Number($('lr').value),
    rank: Number($('rank').value),
    seq: Number($('seq').value),
    seed: 1,
  };
}

function reportError(e) {
  console.error(e);
  status(String(e && e.message ? e.message : e), true);
}

$('file').addEventListener('change', async () => {
  const f = $('file').files[0];
  if (!f) return;
  try { await loadModel(new Uint8Array(await f.arrayBuffer()), f.name); } catch (e) { reportError(e); }
});
$('load-url').addEventListener('click', async () => {
  const url = $('url').value;
  try { await loadModel(await fetchBytes(url), url); } catch (e) { reportError(e); }
});
$('generate').addEventListener('click', () => generate(formInputs()).catch(reportError));
$('selfcheck').addEventListener('click', () => selfcheck().catch(reportError));
$('clear').addEventListener('click', () => { $('output').textContent = ''; });
$('train').addEventListener('click', () => train(trainInputs()).catch(reportError));
$('forget').addEventListener('click', () => {
  try { engine.forget(); status('The adapter is off: the base model answers again.'); } catch (e) { reportError(e); }
});

// The scripted pass for the end-to-end test.
async function scriptedRun() {
  const num = (k, d) => (params.has(k) ? Number(params.get(k)) : d);
  const run = { state: 'running' };
  window.emberRun = run;
  const modelUrl = params.get('model') || 'model.gguf';
  run.info = await loadModel(await fetchBytes(modelUrl), modelUrl);
  if (params.has('selfcheck')) run.selfcheck = await selfcheck();
  if (params.has('prompt')) {
    $('prompt').value = params.get('prompt');
    $('chat').checked = false;
    run.base = await generate({ prompt: params.get('prompt'), maxTokens: num('n', 16), chat: false, temperature: 0, useAdapter: false });
  }
  if (params.has('question')) {
    $('prompt').value = params.get('question');
    $('chat').checked = true;
    run.before = await generate({ prompt: params.get('question'), maxTokens: num('qn', 16), chat: true, temperature: 0, useAdapter: false });
  }
  if (num('steps', 0) > 0) {
    const t = { jsonl: $('data').value, steps: num('steps', 0), batch: num('batch', 1), lr: num('lr', 3e-3), rank: num('rank', 8), seq: num('seq', 64), seed: num('seed', 1) };
    $('steps').value = t.steps; $('batch').value = t.batch; $('lr').value = t.lr; $('rank').value = t.rank; $('seq').value = t.seq;
    run.train = await train(t);
  }
  if (params.has('question') && run.train) {
    run.after = await generate({ prompt: params.get('question'), maxTokens: num('qn', 16), chat: true, temperature: 0, useAdapter: true });
  }
  run.state = 'done';
}

async function main() {
  await init();
  if (!navigator.gpu) {
    status('This browser has no WebGPU (navigator.gpu is missing).', true);
    return;
  }
  try {
    const a = await navigator.gpu.requestAdapter();
    const i = (a && a.info) || {};
    gpuInfo = { vendor: i.vendor, architecture: i.architecture, device: i.device, description: i.description, isFallbackAdapter: i.isFallbackAdapter };
  } catch (_) { /* shown as unnamed */ }
  $('url').value = params.get('model') || $('url').value;
  const dataUrl = params.get('data') || 'demo.jsonl';
  try {
    const r = await fetch(dataUrl);
    if (r.ok) $('data').value = await r.text();
  } catch (_) { /* no example data on this server */ }
  status('Pick a GGUF file or load one from this server.');
  if (params.has('run')) {
    try {
      await scriptedRun();
    } catch (e) {
      reportError(e);
      window.emberRun = { state: 'error', error: String(e && e.message ? e.message : e) };
    }
  }
}

main().catch((e) => {
  reportError(e);
  window.emberRun = { state: 'error', error: String(e && e.message ? e.message : e) };
});
