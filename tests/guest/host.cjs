// The filter module's guest work per request, in Node's V8 with TurboFan only (as Envoy
// runs it: `node --no-liftoff --no-wasm-lazy-compilation`), under a minimal proxy-wasm
// host written here. `cargo xtask bench --only filter` runs it on every module it
// measures in Envoy; see BENCHMARKS.md ("Ninth session").
//
//   node --no-liftoff --no-wasm-lazy-compilation tests/guest/host.cjs \
//     <module.wasm> <plugin-configuration.json> <agent fingerprint> <requests>
//
// It loads the configuration like a worker VM (no canary, nothing in shared data), then
// sends the bench's load: 90% `allowed-0.example`, 10% `blocked-0.example`, one kept-alive
// connection of the given agent, Envoy's clock advancing 50 µs per read, a tick and an
// acknowledged audit callout every 1,000 requests. With `CHRONOGUARD_GUEST_MISSES=1` every
// request names a domain of its own that no policy lists instead (`m<i>.example`, denied
// `no_matching_policy`), so each one is a memo miss: a whole Rego evaluation, as after a
// push that changed the agent's policy. It prints one JSON line: the module's
// compile time, the time per request (guest work plus this host's share, which is the
// same for every module: compare modules, not absolute figures) and the host calls per
// request. A module that does not decide the load as the bench expects is an error.
'use strict';
const fs = require('fs');

const [modulePath, configPath, fingerprint, requestsArg] = process.argv.slice(2);
if (!modulePath || !configPath || !fingerprint) {
  console.error('usage: host.cjs <module.wasm> <configuration.json> <fingerprint> [requests]');
  process.exit(2);
}
const MISSES = process.env.CHRONOGUARD_GUEST_MISSES === '1';
const REQUESTS = Number(requestsArg || (MISSES ? 3000 : 300000));
const WARMUP = MISSES ? 300 : 20000;
const configuration = fs.readFileSync(configPath);
const encoder = new TextEncoder();
const decoder = new TextDecoder();

let instance;
// Views of the module's memory, made again only when it grew (the host's own share of
// the time per request is kept small and the same for every module).
let buffer, u8, dv;
function refresh() {
  if (buffer !== instance.exports.memory.buffer) {
    buffer = instance.exports.memory.buffer;
    u8 = new Uint8Array(buffer);
    dv = new DataView(buffer);
  }
}
const bytes = () => { refresh(); return u8; };
const view = () => { refresh(); return dv; };
const text = (ptr, len) => decoder.decode(bytes().subarray(ptr, ptr + len));

// Returns `data` the way Envoy does: in a buffer the module allocates.
function give(data, retPtr, retSize) {
  const ptr = instance.exports.proxy_on_memory_allocate(data.length || 1);
  bytes().set(data, ptr);
  view().setUint32(retPtr, ptr, true);
  view().setUint32(retSize, data.length, true);
  return 0;
}

// proxy-wasm's serialised header map: count, (name length, value length) pairs, then
// each name and value followed by a NUL.
function headerMap(authority) {
  const pairs = [[':authority', authority], [':path', '/v1/objects/abc'], [':method', 'GET'],
    [':scheme', 'https'], ['user-agent', 'chronoguard-bench'], ['accept', '*/*'],
    ['x-forwarded-proto', 'https'], ['x-request-id', '8f1c2b7e-1d2a-4c3b-9e8f-7a6b5c4d3e2f']]
    .map(([k, v]) => [encoder.encode(k), encoder.encode(v)]);
  let size = 4 + pairs.length * 8;
  for (const [k, v] of pairs) size += k.length + v.length + 2;
  const out = new Uint8Array(size);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, pairs.length, true);
  let at = 4 + pairs.length * 8;
  pairs.forEach(([k, v], i) => {
    dv.setUint32(4 + i * 8, k.length, true);
    dv.setUint32(8 + i * 8, v.length, true);
    out.set(k, at);
    at += k.length + 1;
    out.set(v, at);
    at += v.length + 1;
  });
  return out;
}
const allowed = headerMap('allowed-0.example');
const blocked = headerMap('blocked-0.example');
let headers = allowed;

let nowNs = BigInt(Date.now()) * 1000000n;
const shared = new Map();
let casCounter = 1;
let metricIds = 1;
let lastToken = 0;
let pendingCallout = 0;
let calls = {};
const count = (name) => { calls[name] = (calls[name] || 0) + 1; };
const OK = 0, NOT_FOUND = 1, CAS_MISMATCH = 8;

const connectionId = new Uint8Array(8);
new DataView(connectionId.buffer).setBigUint64(0, 7n, true);
const properties = new Map([
  // Both paths of the connection id: modules before `514c81e` read `connection.id`, so a
  // `--compare` against one of them measures the same work on both sides.
  ['connection_id', connectionId],
  ['connection\0id', connectionId],
  ['connection\0sha256_peer_certificate_digest', encoder.encode(fingerprint)],
  ['connection\0subject_peer_certificate', encoder.encode('CN=bench-agent')],
  ['source\0address', encoder.encode('127.0.0.1:40000')],
  ['plugin_name', encoder.encode('chronoguard')],
]);

const env = {
  proxy_get_header_map_pairs(type, retPtr, retSize) { count('header_maps'); return give(headers, retPtr, retSize); },
  proxy_get_header_map_value(type, keyPtr, keySize, retPtr, retSize) {
    // The audit callout's response (type 6): acknowledged.
    if (type === 6 && text(keyPtr, keySize) === ':status') return give(encoder.encode('200'), retPtr, retSize);
    return NOT_FOUND;
  },
  proxy_get_property(pathPtr, pathSize, retPtr, retSize) {
    count('properties');
    const value = properties.get(text(pathPtr, pathSize));
    return value ? give(value, retPtr, retSize) : NOT_FOUND;
  },
  proxy_get_current_time_nanoseconds(retPtr) { count('clock'); nowNs += 50000n; view().setBigUint64(retPtr, nowNs, true); return OK; },
  proxy_get_buffer_bytes(type, start, max, retPtr, retSize) {
    // 7: the plugin configuration.
    return type === 7 ? give(configuration, retPtr, retSize) : NOT_FOUND;
  },
  proxy_define_metric(type, namePtr, nameSize, retId) { view().setUint32(retId, metricIds++, true); return OK; },
  proxy_get_shared_data(keyPtr, keySize, retPtr, retSize, retCas) {
    count('shared_get');
    const entry = shared.get(text(keyPtr, keySize));
    if (!entry) return NOT_FOUND;
    give(entry.value, retPtr, retSize);
    view().setUint32(retCas, entry.cas, true);
    return OK;
  },
  proxy_set_shared_data(keyPtr, keySize, valuePtr, valueSize, cas) {
    count('shared_set');
    const key = text(keyPtr, keySize);
    const entry = shared.get(key);
    if (cas !== 0 && entry && entry.cas !== cas) return CAS_MISMATCH;
    shared.set(key, { value: bytes().slice(valuePtr, valuePtr + valueSize), cas: ++casCounter });
    return OK;
  },
  proxy_replace_header_map_value() { count('set_header'); return OK; },
  proxy_send_local_response() { count('local_replies'); return OK; },
  proxy_http_call(a, b, c, d, e, f, g, h, i, retToken) {
    count('callouts');
    pendingCallout = ++lastToken;
    view().setUint32(retToken, pendingCallout, true);
    return OK;
  },
  proxy_log(level, ptr, size) {
    // warn and above
    if (level >= 3) console.error(`module log ${level}: ${text(ptr, size)}`);
    return OK;
  },
};
const wasi = {
  random_get(ptr, len) { const b = bytes(); for (let i = 0; i < len; i++) b[ptr + i] = (Math.random() * 256) | 0; return 0; },
  clock_time_get(id, precision, retPtr) { view().setBigUint64(retPtr, nowNs, true); return 0; },
  environ_sizes_get(countPtr, sizePtr) { view().setUint32(countPtr, 0, true); view().setUint32(sizePtr, 0, true); return 0; },
  fd_write(fd, iovs, n, written) {
    let total = 0;
    for (let i = 0; i < n; i++) {
      const ptr = view().getUint32(iovs + i * 8, true), len = view().getUint32(iovs + i * 8 + 4, true);
      process.stderr.write(text(ptr, len));
      total += len;
    }
    view().setUint32(written, total, true);
    return 0;
  },
  proc_exit(code) { throw new Error(`the module exited with ${code}`); },
};

const started = process.hrtime.bigint();
const wasmModule = new WebAssembly.Module(fs.readFileSync(modulePath));
const compileMs = Number(process.hrtime.bigint() - started) / 1e6;
// Imports the request path never calls answer "ok" and are counted.
for (const im of WebAssembly.Module.imports(wasmModule)) {
  const table = im.module === 'env' ? env : wasi;
  if (!table[im.name]) table[im.name] = () => { count(`other:${im.name}`); return 0; };
}
instance = new WebAssembly.Instance(wasmModule, { env, wasi_snapshot_preview1: wasi });
const wasm = instance.exports;
wasm._initialize();
wasm.proxy_on_vm_start(1, 0);
if (!wasm.proxy_on_configure(1, configuration.length)) {
  console.error('the module refused the configuration');
  process.exit(1);
}

// Memo misses: a domain per request, never the same twice in a run.
let missed = 0;
function run(requests) {
  for (let i = 0; i < requests; i++) {
    headers = MISSES ? headerMap(`m${missed++}.example`) : i % 10 === 0 ? blocked : allowed;
    wasm.proxy_on_request_headers(2, 8, 1);
    if (i % 1000 === 999) {
      wasm.proxy_on_tick(1);
      if (pendingCallout) {
        const token = pendingCallout;
        pendingCallout = 0;
        wasm.proxy_on_http_call_response(1, token, 1, 0, 0);
      }
    }
  }
}

run(WARMUP);
calls = {};
const t0 = process.hrtime.bigint();
run(REQUESTS);
const elapsedNs = Number(process.hrtime.bigint() - t0);
const perRequest = Object.fromEntries(
  Object.entries(calls).map(([name, n]) => [name, Math.round((n / REQUESTS) * 1000) / 1000]));
// The bench's load: 90% allowed, 10% denied (a local reply). Modules since the twelfth
// session take Envoy's x-request-id as the decision id and set no header; older ones set
// the decision-id header on allowed requests (`--compare`). The bench's stage modules
// answer nothing (noop ... audit) or, older ones, only the allowed ones (header: denials
// go through).
const near = (value, expected) => Math.abs((value || 0) - expected) <= 0.01;
const answered = (perRequest.set_header || 0) + (perRequest.local_replies || 0) > 0;
const asExpected = MISSES
  ? near(perRequest.local_replies, 1)
  : (near(perRequest.set_header, 0.9) || near(perRequest.set_header, 0))
    && (near(perRequest.local_replies, 0.1) || near(perRequest.local_replies, 0));
if (answered && !asExpected) {
  console.error(`the module did not decide the load as expected: ${JSON.stringify(perRequest)}`);
  process.exit(1);
}
console.log(JSON.stringify({
  module: modulePath,
  compile_ms: Math.round(compileMs * 10) / 10,
  misses: MISSES,
  us_per_request: Math.round((elapsedNs / REQUESTS) * 1000) / 1e6,
  requests: REQUESTS,
  per_request: perRequest,
}));
