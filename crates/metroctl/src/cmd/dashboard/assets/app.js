// The Metropolis dashboard: plain DOM, no framework. Everything that comes
// from the cluster is written as text (textContent, text nodes), never as
// HTML: labels and error messages are user input.
'use strict';

const TOKEN = document.querySelector('meta[name="dashboard-token"]').content;
const $ = (id) => document.getElementById(id);

// el('td', {class: 'x'}, 'text', child): an element; strings become text nodes.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c !== undefined && c !== null) e.append(c);
  }
  return e;
}

function clear(e) {
  while (e.firstChild) e.firstChild.remove();
}

async function api(path, options) {
  const opts = options || {};
  const headers = { 'x-dashboard-token': TOKEN };
  if (opts.body !== undefined) headers['content-type'] = 'application/json';
  const r = await fetch(path, {
    method: opts.method || 'GET',
    headers,
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || `${r.status} ${r.statusText}`);
  return data;
}

function stream(path, params) {
  const q = new URLSearchParams(Object.assign({ token: TOKEN }, params || {}));
  return new EventSource(`${path}?${q}`);
}

// Names as metroctl prints them.
const short = (s, prefix) => (s || '').replace(prefix, '');
const ROLES = [
  ['consensusMember', 'ConsensusMember'],
  ['kubernetesController', 'KubernetesController'],
  ['kubernetesWorker', 'KubernetesWorker'],
];
const roleNames = (n) => ROLES.filter(([k]) => n.roles && n.roles[k]).map(([, name]) => name);
const labelsOf = (n) => (n.labels && n.labels.pairs) || [];
function version(n) {
  const r = n.status && n.status.version && n.status.version.release;
  return r ? `${r.major || 0}.${r.minor || 0}.${r.patch || 0}` : '';
}
// protobuf JSON durations: "1.5s".
const seconds = (d) => (typeof d === 'string' ? parseFloat(d) : NaN);

// ---- Nodes, live ----

let nodes = new Map();
// id -> {secs, at}: the last heartbeat age heard, and when.
const ages = new Map();
let source = null;
let recentlyChanged = new Set();

function ageText(n) {
  const a = ages.get(n.id);
  if (!a) return '–';
  let s = a.secs;
  // A timed-out node sends nothing: its silence grows with the clock.
  if (n.health === 'HEALTH_HEARTBEAT_TIMEOUT') s += (Date.now() - a.at) / 1000;
  return `${s.toFixed(1)}s`;
}

function noteAge(n) {
  const s = seconds(n.timeSinceHeartbeat);
  if (!Number.isNaN(s)) ages.set(n.id, { secs: s, at: Date.now() });
  else ages.delete(n.id);
}

function badge(text, kind) {
  return el('span', { class: `badge ${kind}` }, text);
}

function renderNodes() {
  const body = $('node-rows');
  clear(body);
  const sorted = [...nodes.values()].sort((a, b) => a.id.localeCompare(b.id));
  for (const n of sorted) {
    const state = short(n.state, 'NODE_STATE_');
    const health = short(n.health, 'HEALTH_');
    const labels = el('ul', { class: 'labels' },
      ...labelsOf(n).map((p) => el('li', { class: 'label' }, `${p.key}=${p.value}`)));
    const actions = el('td', { class: 'actions' });
    if (n.state === 'NODE_STATE_NEW') {
      actions.append(el('button', { type: 'button', class: 'small', 'aria-label': `Approve ${n.id}`,
        onclick: () => approveDialog(n) }, 'Approve'));
    }
    actions.append(
      el('button', { type: 'button', class: 'small', 'aria-label': `Labels of ${n.id}`,
        onclick: () => labelsDialog(n) }, 'Labels…'),
      el('button', { type: 'button', class: 'small', 'aria-label': `Roles of ${n.id}`,
        onclick: () => rolesDialog(n) }, 'Roles…'),
      el('button', { type: 'button', class: 'small', 'aria-label': `Logs of ${n.id}`,
        onclick: () => followLogs(n.id) }, 'Logs'));
    const row = el('tr', { 'data-node': n.id, class: recentlyChanged.has(n.id) ? 'changed' : '' },
      el('th', { scope: 'row', class: 'mono' }, n.id),
      el('td', {}, badge(state, `state-${state.toLowerCase()}`)),
      el('td', { class: 'mono' }, (n.status && n.status.externalAddress) || ''),
      el('td', {}, badge(health, `health-${health.toLowerCase()}`)),
      el('td', {}, roleNames(n).join(', ')),
      el('td', {}, labels),
      el('td', { class: 'age mono' }, ageText(n)),
      el('td', { class: 'mono' }, version(n)),
      actions);
    body.append(row);
  }
  $('node-count').textContent = `(${nodes.size})`;
  $('no-nodes').hidden = nodes.size !== 0;
}

function setLive(text, ok) {
  const live = $('live');
  live.textContent = text;
  live.className = ok ? 'live ok' : 'live bad';
}

function watch(filter) {
  if (source) source.close();
  $('filter-error').textContent = '';
  $('no-nodes').textContent = 'No node matches.';
  $('filter').removeAttribute('aria-invalid');
  setLive('Connecting…', false);
  source = stream('/api/nodes/watch', { filter });
  source.addEventListener('reset', (e) => {
    nodes = new Map(JSON.parse(e.data).map((n) => [n.id, n]));
    nodes.forEach(noteAge);
    renderNodes();
  });
  source.addEventListener('change', (e) => {
    const c = JSON.parse(e.data);
    if (c.type === 'DELETED') {
      nodes.delete(c.id);
      ages.delete(c.id);
    } else {
      nodes.set(c.node.id, c.node);
      noteAge(c.node);
      recentlyChanged.add(c.node.id);
      setTimeout(() => { recentlyChanged.delete(c.node.id); renderNodes(); }, 2000);
    }
    renderNodes();
  });
  source.addEventListener('heartbeats', (e) => {
    const now = Date.now();
    for (const [id, secs] of Object.entries(JSON.parse(e.data))) ages.set(id, { secs, at: now });
    renderAges();
  });
  source.addEventListener('status', (e) => {
    const s = JSON.parse(e.data);
    if (s.live) setLive(`Live — curator leader ${s.leader}`, true);
    else setLive(`Reconnecting: ${s.message}`, false);
  });
  source.addEventListener('fatal', (e) => {
    source.close();
    source = null;
    const msg = JSON.parse(e.data).error;
    if (filter) {
      // No valid view: show none rather than a stale one.
      nodes = new Map();
      renderNodes();
      $('no-nodes').textContent = 'Nothing shown: the filter was refused.';
      $('filter-error').textContent = msg;
      $('filter').setAttribute('aria-invalid', 'true');
      setLive('Not watching: the filter was refused', false);
    } else {
      setLive(`Not watching: ${msg}`, false);
    }
  });
  source.onerror = () => {
    if (source) setLive('Lost the connection to metroctl; retrying…', false);
  };
}

function renderAges() {
  for (const row of $('node-rows').querySelectorAll('tr')) {
    const n = nodes.get(row.dataset.node);
    if (n) row.querySelector('.age').textContent = ageText(n);
  }
}

// ---- Actions, each confirmed in a dialog ----

let dialogAction = null;

// Opens the dialog; plan() says what will happen (or throws why not), run()
// does it once confirmed.
function openDialog(title, text, bodyNodes, plan, run) {
  $('dialog-title').textContent = title;
  $('dialog-text').textContent = text;
  const body = $('dialog-body');
  clear(body);
  bodyNodes.forEach((b) => body.append(b));
  const update = () => {
    try {
      $('dialog-plan').textContent = plan();
      $('dialog-ok').disabled = false;
    } catch (err) {
      $('dialog-plan').textContent = err.message;
      $('dialog-ok').disabled = true;
    }
  };
  body.oninput = update;
  update();
  dialogAction = run;
  $('dialog').showModal();
  const first = body.querySelector('input') || $('dialog-ok');
  first.focus();
}

async function confirmDialog(e) {
  e.preventDefault();
  const run = dialogAction;
  dialogAction = null;
  $('dialog').close();
  if (!run) return;
  const result = $('action-result');
  result.className = 'result';
  result.textContent = 'Working…';
  try {
    result.textContent = await run();
    result.className = 'result ok';
  } catch (err) {
    result.textContent = err.message;
    result.className = 'result bad';
  }
  loadAudit();
}

function approveDialog(n) {
  openDialog(`Approve ${n.id}?`,
    'Compare this ID with the one in the new node\'s own log before approving it.',
    [], () => `The node joins the cluster as ${n.id}.`,
    async () => (await api(`/api/nodes/${encodeURIComponent(n.id)}/approve`, { method: 'POST', body: {} })).message);
}

// "zone=a rack-": set zone, remove rack, as `metroctl node label`.
function parseLabelChanges(text) {
  const upsert = [];
  const del = [];
  for (const word of text.split(/[\s,]+/).filter(Boolean)) {
    const eq = word.indexOf('=');
    if (eq > 0) upsert.push({ key: word.slice(0, eq), value: word.slice(eq + 1) });
    else if (word.endsWith('-') && word.length > 1) del.push(word.slice(0, -1));
    else throw new Error(`"${word}" is neither key=value (set) nor key- (remove)`);
  }
  if (!upsert.length && !del.length) throw new Error('Type a change: key=value to set, key- to remove.');
  return { upsert, delete: del };
}

function labelsDialog(n) {
  const current = labelsOf(n).map((p) => `${p.key}=${p.value}`).join(' ') || '(none)';
  const input = el('input', { id: 'label-changes', type: 'text', spellcheck: 'false',
    autocomplete: 'off', placeholder: 'zone=a rack-' });
  openDialog(`Labels of ${n.id}`, `Now: ${current}`,
    [el('label', { for: 'label-changes' }, 'Changes (key=value sets, key- removes)'), input],
    () => {
      const c = parseLabelChanges(input.value);
      const parts = [];
      if (c.upsert.length) parts.push(`set ${c.upsert.map((p) => `${p.key}=${p.value}`).join(', ')}`);
      if (c.delete.length) parts.push(`remove ${c.delete.join(', ')}`);
      return `Will ${parts.join(' and ')}, in one change.`;
    },
    async () => (await api(`/api/nodes/${encodeURIComponent(n.id)}/labels`,
      { method: 'POST', body: parseLabelChanges(input.value) })).message);
}

function rolesDialog(n) {
  const have = new Set(roleNames(n));
  const boxes = ROLES.map(([, name]) => {
    const box = el('input', { type: 'checkbox', id: `role-${name}`, name });
    box.checked = have.has(name);
    return el('div', { class: 'check' }, box, el('label', { for: `role-${name}` }, name));
  });
  const wanted = () => boxes.map((b) => b.querySelector('input'))
    .filter((b) => b.checked !== have.has(b.name))
    .map((b) => ({ role: b.name, on: b.checked }));
  openDialog(`Roles of ${n.id}`, 'Tick the roles the node should have.', boxes,
    () => {
      const w = wanted();
      if (!w.length) throw new Error('No change.');
      return `Will ${w.map((c) => `${c.on ? 'add' : 'remove'} ${c.role}`).join(', ')}.`;
    },
    async () => {
      const done = [];
      for (const c of wanted()) {
        done.push((await api(`/api/nodes/${encodeURIComponent(n.id)}/roles`, { method: 'POST', body: c })).message);
      }
      return done.join(' ');
    });
}

// ---- Cluster, audit log, logs ----

function dl(pairs) {
  return el('dl', { class: 'facts' }, ...pairs.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
}

function expiry(iso) {
  if (!iso) return '';
  // 9999-12-31T23:59:59Z: RFC 5280's "no well-defined expiration date".
  if (iso.startsWith('9999-')) return 'never expires';
  const d = (Date.parse(iso) - Date.now()) / 86400000;
  return Number.isNaN(d) ? iso : `${iso} (${Math.floor(d)} days left)`;
}

// A fingerprint may wrap only between bytes (<wbr> after each colon: it
// breaks the line without adding a character to what is copied).
function fingerprint(text) {
  const code = el('code', {});
  text.split(':').forEach((part, i) => {
    if (i > 0) code.append(':', document.createElement('wbr'));
    code.append(part);
  });
  return code;
}

async function loadCluster() {
  const out = $('cluster');
  try {
    const c = await api('/api/cluster');
    clear(out);
    const cfg = c.configuration || {};
    const sync = ((cfg.kubernetes || {}).nodeLabelsToSynchronize || []).map((r) => r.regexp);
    const leader = c.leader || {};
    out.append(dl([
      ['CA fingerprint (SHA-256)', c.ca.fingerprint_sha256 ? fingerprint(c.ca.fingerprint_sha256) : (c.ca.error || '')],
      ['CA valid until', expiry(c.ca.not_after)],
      ['Curator leader', leader.leaderNodeId ? `${leader.leaderNodeId} at ${leader.leaderHost}:${leader.leaderPort}` : '(none known)'],
      ['Cluster domain', cfg.clusterDomain || ''],
      ['TPM mode', cfg.tpmMode || ''],
      ['Storage security', cfg.storageSecurityPolicy || ''],
      ['Labels synchronized to Kubernetes', sync.length ? sync.join(', ') : '(none)'],
    ]));
    const cs = c.consensus || {};
    out.append(el('h3', {}, 'Consensus'));
    if (cs.error) {
      out.append(el('p', { class: 'error' }, cs.error));
      return;
    }
    const backend = short(cs.backend, 'CONSENSUS_BACKEND_');
    out.append(dl([['Store', backend.toLowerCase()], ['Revision', String(cs.revision || 0)]]));
    const members = cs.members || [];
    if (members.length) {
      out.append(el('table', { class: 'small-table' },
        el('caption', { class: 'visually-hidden' }, 'Consensus members'),
        el('thead', {}, el('tr', {}, ...['Member', 'Node', 'Kind'].map((h) => el('th', { scope: 'col' }, h)))),
        el('tbody', {}, ...members.map((m) => el('tr', {},
          el('td', { class: 'mono' }, BigInt(m.id || 0).toString(16)),
          el('td', { class: 'mono' }, m.name || '(not started)'),
          el('td', {}, (m.isLearner ? 'learner' : 'voter') + (m.id === cs.raftLeaderId ? ' (raft leader)' : '')))))));
    } else {
      out.append(el('p', {}, `One member: ${leader.leaderNodeId || 'the curator leader'} (embedded store).`));
    }
  } catch (err) {
    clear(out);
    out.append(el('p', { class: 'error' }, err.message));
  }
}

const GRPC_CODES = ['OK', 'CANCELLED', 'UNKNOWN', 'INVALID_ARGUMENT', 'DEADLINE_EXCEEDED',
  'NOT_FOUND', 'ALREADY_EXISTS', 'PERMISSION_DENIED', 'RESOURCE_EXHAUSTED', 'FAILED_PRECONDITION',
  'ABORTED', 'OUT_OF_RANGE', 'UNIMPLEMENTED', 'INTERNAL', 'UNAVAILABLE', 'DATA_LOSS', 'UNAUTHENTICATED'];

async function loadAudit() {
  const out = $('audit');
  try {
    const entries = await api('/api/audit');
    clear(out);
    if (!entries.length) {
      out.append(el('p', {}, 'The audit log is empty.'));
      return;
    }
    out.append(el('table', { class: 'small-table' },
      el('caption', { class: 'visually-hidden' }, 'Recorded calls, newest first'),
      el('thead', {}, el('tr', {}, ...['Time', 'Who', 'Method', 'Result'].map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, ...entries.map((e) => el('tr', {},
        el('td', { class: 'mono' }, (e.time || '').replace(/\.\d+Z$/, 'Z')),
        el('td', {}, e.identity || (e.nodeId ? `node ${e.nodeId}` : '')),
        el('td', {}, (e.method || '').split('/').pop()),
        el('td', {}, [GRPC_CODES[e.code || 0] || String(e.code), e.message].filter(Boolean).join(': ')))))));
  } catch (err) {
    clear(out);
    out.append(el('p', { class: 'error' }, err.message));
  }
}

let logs = null;
function followLogs(id) {
  if (logs) logs.close();
  const section = $('logs-section');
  section.hidden = false;
  $('logs-heading').textContent = `Logs of ${id}`;
  $('logs-error').textContent = '';
  const pre = $('logs');
  clear(pre);
  logs = stream(`/api/nodes/${encodeURIComponent(id)}/logs`);
  logs.addEventListener('entry', (e) => {
    const entry = JSON.parse(e.data);
    const l = entry.leveled;
    const lines = l
      ? (l.lines || []).map((line) => [`${short(l.severity, 'LEVELED_LOG_SEVERITY_').slice(0, 1)} ${l.timestamp || ''} ${entry.dn}] ${line}`, short(l.severity, 'LEVELED_LOG_SEVERITY_').toLowerCase()])
      : [[`R ${entry.dn} ${(entry.raw || {}).data || ''}`, 'raw']];
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    for (const [text, kind] of lines) pre.append(el('span', { class: `log ${kind}` }, `${text}\n`));
    while (pre.childNodes.length > 1000) pre.firstChild.remove();
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  });
  logs.addEventListener('fatal', (e) => {
    logs.close();
    logs = null;
    $('logs-error').textContent = JSON.parse(e.data).error;
  });
  section.scrollIntoView({ block: 'start' });
}

// ---- Wiring ----

document.addEventListener('DOMContentLoaded', () => {
  const params = new URLSearchParams(location.search);
  const initial = params.get('filter') || '';
  $('filter').value = initial;
  $('filter-form').addEventListener('submit', (e) => {
    e.preventDefault();
    watch($('filter').value.trim());
  });
  $('filter-clear').addEventListener('click', () => {
    $('filter').value = '';
    watch('');
  });
  $('dialog-form').addEventListener('submit', confirmDialog);
  $('dialog-cancel').addEventListener('click', () => { dialogAction = null; $('dialog').close(); });
  $('cluster-refresh').addEventListener('click', loadCluster);
  $('audit-refresh').addEventListener('click', loadAudit);
  $('logs-close').addEventListener('click', () => {
    if (logs) logs.close();
    logs = null;
    $('logs-section').hidden = true;
  });
  setInterval(renderAges, 1000);
  setInterval(loadCluster, 15000);
  watch(initial);
  loadCluster();
  loadAudit();
});
