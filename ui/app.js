// Understudy's ops dashboard: three views over the controller's JSON API, refreshed every second.
//
//   #/             the release page: services as a dependency graph, releases, "start a release"
//   #/rollouts/ID  one rollout: phase, verdict, evidence, approvals, charts (uPlot), transitions
//   #/machines     the machine registry with each machine's role and version history
//
// Plain ES2020, no build step. The page's CSP forbids inline scripts and style attributes, so the
// views are <template>s in index.html cloned here, every handler is added with addEventListener,
// and text goes in with textContent only (no innerHTML anywhere). The admin token lives in
// sessionStorage and is sent only as a bearer header: on the session check and on mutations.
'use strict';

(() => {
  const POLL_MS = 1000;
  // A request without an answer this late counts as failed (a frozen controller holds it open).
  const REQUEST_TIMEOUT_MS = 5000;
  // An optional endpoint that answered 404 (a controller without it) is asked again this late.
  const OPTIONAL_RETRY_MS = 15000;
  const TOKEN_KEY = 'understudy.token';
  const FINISHED = new Set(['complete', 'rolled_back', 'aborted']);
  const ROLLBACK_REFUSED = new Set(['rolled_back', 'aborted']);
  const CHART_HEIGHT = 260;
  const COLORS = { v1: '#2563eb', v2: '#c026d3', control: '#0d9488' };
  const TEST_COLORS = ['#2563eb', '#c026d3', '#ea580c', '#0d9488', '#7c3aed', '#65a30d', '#0891b2', '#be123c'];
  const FAIL_LINE = '#dc2626';
  const PASS_LINE = '#16a34a';

  // ---------------------------------------------------------------- DOM helpers

  const $ = (selector, root = document) => root.querySelector(selector);
  const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

  /** An element with attributes (`text` sets textContent, `class` the class) and children. */
  function el(tag, attrs = {}, ...children) {
    return build(document.createElement(tag), attrs, children);
  }

  /** An SVG element: the namespace is read from the <svg> index.html declares, not written here. */
  function svgEl(tag, attrs = {}) {
    return build(document.createElementNS(svgNamespace(), tag), attrs, []);
  }

  function svgNamespace() {
    return $('#tpl-release').content.querySelector('svg').namespaceURI;
  }

  function build(node, attrs, children) {
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === 'text') node.textContent = String(value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setText(node, text) {
    const value = text === null || text === undefined ? '' : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  /** Replaces `node`'s children with `make()` only when `signature` changed since the last call,
   * so a table that did not change is not rebuilt every second; keeps the keyboard focus on the
   * element with the same `data-focus-key`. */
  function replaceIfChanged(node, signature, make) {
    if (node.dataset.signature === signature) return false;
    const focused = document.activeElement;
    const focusKey = focused && node.contains(focused) ? focused.dataset.focusKey : undefined;
    node.replaceChildren(...make());
    node.dataset.signature = signature;
    if (focusKey) {
      const again = $(`[data-focus-key="${CSS.escape(focusKey)}"]`, node);
      if (again) again.focus();
    }
    return true;
  }

  function setEnabled(button, enabled, reason) {
    const off = !enabled || button.dataset.busy === '1';
    button.disabled = off;
    if (enabled) button.removeAttribute('title');
    else button.title = reason;
  }

  function cloneTemplate(id) {
    const root = el('div', { class: 'view', 'data-view': id.replace(/^tpl-/, '') });
    root.append($(`#${id}`).content.cloneNode(true));
    return root;
  }

  // ---------------------------------------------------------------- formatting

  const pad2 = (n) => String(n).padStart(2, '0');

  function fmtClock(ms) {
    const d = new Date(ms);
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }

  /** HH:MM:SS today, else the date too. */
  function fmtWhen(ms) {
    if (typeof ms !== 'number') return '—';
    const d = new Date(ms);
    if (d.toDateString() === new Date().toDateString()) return fmtClock(ms);
    return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${fmtClock(ms)}`;
  }

  function fmtDuration(ms) {
    if (typeof ms !== 'number' || !Number.isFinite(ms)) return '—';
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${pad2(s % 60)}s`;
    return `${Math.floor(s / 3600)}h ${pad2(Math.floor(s / 60) % 60)}m`;
  }

  /** A latency in microseconds: 850µs, 12.3ms, 1.20s. */
  function fmtUs(us) {
    if (typeof us !== 'number' || !Number.isFinite(us)) return '—';
    if (us < 1000) return `${trim(us, us < 10 ? 1 : 0)}µs`;
    if (us < 1e6) return `${trim(us / 1000, us < 1e4 ? 2 : 1)}ms`;
    return `${trim(us / 1e6, 2)}s`;
  }

  function trim(x, digits) {
    return String(Number(x.toFixed(digits)));
  }

  function fmtRate(rate) {
    if (typeof rate !== 'number' || !Number.isFinite(rate)) return '—';
    return `${(rate * 100).toFixed(rate === 0 ? 0 : 2)}%`;
  }

  function fmtNum(x, digits = 3) {
    if (typeof x !== 'number' || !Number.isFinite(x)) return '—';
    return Number.isInteger(x) ? x.toLocaleString('en-US') : x.toFixed(digits);
  }

  function fmtInterval(interval, fmt = fmtNum) {
    if (!Array.isArray(interval) || interval.length !== 2) return '—';
    return `[${fmt(interval[0])}, ${fmt(interval[1])}]`;
  }

  /** An e-value: plain between 0.01 and 10 000, else as a power of ten. */
  function fmtE(v) {
    if (typeof v !== 'number' || !Number.isFinite(v)) return '—';
    if (v === 0) return '0';
    if (v >= 0.01 && v < 1e4) return trim(v, v < 1 ? 2 : 1);
    return `1e${Math.round(Math.log10(v))}`;
  }

  // ---------------------------------------------------------------- HTTP

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /** One exchange with the controller: `{status, ok, data, text}`; throws only when the
   * controller cannot be reached or does not answer in time, never for an HTTP status. */
  async function request(method, path, { body, token } = {}) {
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (token) headers.Authorization = `Bearer ${token}`;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
    let response;
    let text;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
        credentials: 'omit',
        signal: abort.signal,
      });
      text = await response.text();
    } catch (e) {
      const late = abort.signal.aborted ? ` within ${REQUEST_TIMEOUT_MS / 1000}s` : '';
      throw new HttpError(0, `no answer to ${method} ${path}${late}`);
    } finally {
      clearTimeout(timer);
    }
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    return { status: response.status, ok: response.ok, data, text };
  }

  /** The endpoint's `error` text, else the start of what it answered. */
  function errorText(answer) {
    if (answer.data && typeof answer.data.error === 'string') return answer.data.error;
    return (answer.text || `HTTP ${answer.status}`).slice(0, 300);
  }

  function readFailed(path, answer) {
    const said = answer.text ? `: ${errorText(answer)}` : '';
    return new HttpError(answer.status, `GET ${path} answered HTTP ${answer.status}${said}`);
  }

  async function getJson(path) {
    const answer = await request('GET', path);
    if (!answer.ok) throw readFailed(path, answer);
    return answer.data;
  }

  // The routes the controller serves, from its OpenAPI document (every route is in it): a route
  // this page can use but the controller lacks (an older controller) is shown as "not available"
  // without being asked for, so it does not fill the browser's console with 404s.
  const routes = { known: null, triedAt: 0 };
  const ROUTES_RETRY_MS = 30000;

  async function loadRoutes() {
    routes.triedAt = Date.now();
    try {
      const doc = await getJson('/api/v1/openapi.json');
      routes.known = new Set(Object.keys((doc && doc.paths) || {}));
    } catch (_) {
      routes.known = null; // unknown: the optional routes are simply tried
    }
  }

  function lacksRoute(template) {
    return routes.known !== null && !routes.known.has(template);
  }

  const missingSince = new Map();

  /** A read the controller may not serve: `{available: false}` when its OpenAPI document does not
   * list `template` or it answers 404 (then not asked again for a while), else `{available, data}`. */
  async function getOptional(key, path, template = path) {
    if (lacksRoute(template)) return { available: false };
    const since = missingSince.get(key);
    if (since !== undefined && Date.now() - since < OPTIONAL_RETRY_MS) return { available: false };
    const answer = await request('GET', path);
    if (answer.status === 404) {
      missingSince.set(key, Date.now());
      return { available: false };
    }
    if (!answer.ok) throw readFailed(path, answer);
    missingSince.delete(key);
    return { available: true, data: answer.data };
  }

  // ---------------------------------------------------------------- banner, notices, liveness

  function showError(what, status, message) {
    const banner = $('#error-banner');
    $('#notice').hidden = true;
    const prefix = status ? `${what} refused (HTTP ${status})` : `${what} not sent`;
    setText($('#error-text'), `${prefix}: ${message}`);
    if (status) banner.dataset.status = String(status);
    else delete banner.dataset.status;
    banner.hidden = false;
  }

  function clearError() {
    const banner = $('#error-banner');
    banner.hidden = true;
    setText($('#error-text'), '');
    delete banner.dataset.status;
  }

  let noticeTimer = null;

  function showNotice(text) {
    const notice = $('#notice');
    setText(notice, text);
    notice.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => {
      notice.hidden = true;
    }, 6000);
  }

  const liveness = { lastOk: null, lostSince: null };

  function markUpdated() {
    liveness.lastOk = Date.now();
    liveness.lostSince = null;
    setText($('#updated'), `last updated ${fmtClock(liveness.lastOk)}`);
    $('#unreachable').hidden = true;
    document.body.dataset.connection = 'ok';
  }

  function markUnreachable(error) {
    if (liveness.lostSince === null) liveness.lostSince = Date.now();
    const data = liveness.lastOk === null ? 'nothing loaded yet' : `the figures below are from ${fmtClock(liveness.lastOk)}`;
    setText($('#unreachable'),
      `Controller unreachable since ${fmtClock(liveness.lostSince)} (${error.message}). ` +
      `Retrying every second; ${data}.`);
    $('#unreachable').hidden = false;
    document.body.dataset.connection = 'lost';
  }

  async function refreshLeader() {
    const leader = await getOptional('leader', '/api/v1/leader');
    const node = $('#leader');
    if (!leader.available || !leader.data) {
      setText(node, '');
      return;
    }
    const role = String(leader.data.role || 'unknown');
    node.dataset.role = role;
    setText(node, role === 'leader' ? 'leader' : `${role}: changes are refused here`);
  }

  // ---------------------------------------------------------------- session (the admin token)

  const session = { token: sessionStorage.getItem(TOKEN_KEY), operator: null };

  function signedIn() {
    return Boolean(session.token);
  }

  function setSessionStatus(state, text) {
    const status = $('#signin-status');
    status.dataset.state = state;
    setText(status, text);
    $('#signout-button').disabled = state !== 'signed-in';
  }

  /** Checks a token with `GET /api/v1/session`; keeps it only if the controller accepts it. A
   * controller without that endpoint (404) cannot check it: the token is kept, marked unverified. */
  async function signIn(token, { stored = false } = {}) {
    if (lacksRoute('/api/v1/session')) {
      keepToken(token, null);
      setSessionStatus('signed-in', 'signed in (token not verified: this controller has no session endpoint)');
      return;
    }
    let answer;
    try {
      answer = await request('GET', '/api/v1/session', { token });
    } catch (e) {
      if (stored) {
        // The page was reloaded while the controller is away: keep the token, unchecked.
        keepToken(token, null);
        setSessionStatus('signed-in', 'signed in (token not checked: controller unreachable)');
      } else {
        forgetToken();
        setSessionStatus('refused', 'controller unreachable: the token could not be checked');
      }
      return;
    }
    if (answer.ok && answer.data && typeof answer.data.operator === 'string') {
      keepToken(token, answer.data.operator);
      setSessionStatus('signed-in', `signed in as ${answer.data.operator}`);
    } else if (answer.status === 404) {
      keepToken(token, null);
      setSessionStatus('signed-in', 'signed in (token not verified: this controller has no session endpoint)');
    } else {
      forgetToken();
      setSessionStatus('refused', errorText(answer));
    }
  }

  function keepToken(token, operator) {
    session.token = token;
    session.operator = operator;
    sessionStorage.setItem(TOKEN_KEY, token);
    authChanged();
  }

  function forgetToken() {
    session.token = null;
    session.operator = null;
    sessionStorage.removeItem(TOKEN_KEY);
    authChanged();
  }

  function authChanged() {
    if (current.view && current.view.syncAuth) current.view.syncAuth();
  }

  function setUpSignIn() {
    const input = $('#signin-token');
    $('#signin').addEventListener('submit', async (event) => {
      event.preventDefault();
      const token = input.value.trim();
      input.value = '';
      if (!token) {
        setSessionStatus('refused', 'enter the admin token first');
        return;
      }
      await signIn(token);
    });
    $('#signout-button').addEventListener('click', () => {
      forgetToken();
      setSessionStatus('signed-out', 'signed out: read-only');
    });
    if (session.token) signIn(session.token, { stored: true });
  }

  // ---------------------------------------------------------------- mutations

  /** POSTs `body` with the token; the answer's data, or null after showing why it was refused. */
  async function act(what, path, body) {
    if (!signedIn()) {
      showError(what, null, 'sign in with the admin token first');
      return null;
    }
    let answer;
    try {
      answer = await request('POST', path, { body, token: session.token });
    } catch (e) {
      showError(what, null, `${e.message}: it may or may not have been done, see the next refresh`);
      return null;
    }
    if (!answer.ok) {
      showError(what, answer.status, errorText(answer));
      return null;
    }
    clearError();
    return answer.data;
  }

  /** Runs `action` with `button` disabled meanwhile. */
  async function withBusy(button, action) {
    button.dataset.busy = '1';
    button.disabled = true;
    try {
      return await action();
    } finally {
      delete button.dataset.busy;
      authChanged();
    }
  }

  // ---------------------------------------------------------------- routing and polling

  const current = { route: null, view: null, timer: null, inFlight: false, again: false };

  function parseRoute(hash) {
    const path = (hash || '').replace(/^#/, '') || '/';
    if (path === '/') return { name: 'release' };
    if (path === '/machines') return { name: 'machines' };
    const match = /^\/rollouts\/([^/]+)$/.exec(path);
    if (match) return { name: 'rollout', id: safeDecode(match[1]) };
    return { name: 'unknown', path };
  }

  function safeDecode(text) {
    try {
      return decodeURIComponent(text);
    } catch (_) {
      return text;
    }
  }

  function makeView(route) {
    if (route.name === 'release') return releaseView();
    if (route.name === 'rollout') return rolloutView(route.id);
    if (route.name === 'machines') return machinesView();
    return unknownView(route.path);
  }

  function mount() {
    const route = parseRoute(location.hash);
    if (current.view) current.view.unmount();
    current.route = route;
    current.view = makeView(route);
    $('#view').replaceChildren(current.view.root);
    markNav(route);
    clearError();
    if (current.view.syncAuth) current.view.syncAuth();
    poll();
  }

  function markNav(route) {
    for (const link of $$('.nav [data-nav]')) {
      if (link.dataset.nav === route.name) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
    const rollout = $('.nav-rollout');
    rollout.hidden = route.name !== 'rollout';
    setText(rollout, route.name === 'rollout' ? `Rollout #${route.id}` : '');
  }

  /** One refresh of the current view; one at a time, the next a second after this one ends. */
  async function poll() {
    if (current.inFlight) {
      current.again = true;
      return;
    }
    clearTimeout(current.timer);
    if (document.hidden) return;
    current.inFlight = true;
    const view = current.view;
    try {
      if (routes.known === null && Date.now() - routes.triedAt > ROUTES_RETRY_MS) await loadRoutes();
      await view.refresh();
      await refreshLeader();
      if (view === current.view) markUpdated();
    } catch (error) {
      // A failed read: the notice. Anything else is a bug of this page: let it be recorded.
      if (!(error instanceof HttpError)) throw error;
      if (view === current.view) markUnreachable(error);
    } finally {
      current.inFlight = false;
      if (current.again) {
        current.again = false;
        poll();
      } else {
        schedule();
      }
    }
  }

  function schedule() {
    clearTimeout(current.timer);
    if (!document.hidden) current.timer = setTimeout(poll, POLL_MS);
  }

  function onVisibility() {
    if (document.hidden) clearTimeout(current.timer);
    else poll();
  }

  let resizeFrame = 0;

  function onResize() {
    cancelAnimationFrame(resizeFrame);
    resizeFrame = requestAnimationFrame(() => {
      if (current.view && current.view.resize) current.view.resize();
    });
  }

  function unknownView(path) {
    const root = el('div', { class: 'view' },
      el('section', { class: 'panel' },
        el('h2', { text: 'No such page' }),
        el('p', {}, `Nothing is shown at ${path}. Go to the `, el('a', { href: '#/', text: 'release page' }),
          ' or the ', el('a', { href: '#/machines', text: 'machines' }), '.')));
    return { root, refresh: async () => {}, unmount() {} };
  }

  // ---------------------------------------------------------------- release page

  function releaseView() {
    const root = cloneTemplate('tpl-release');
    const graph = serviceGraph($('#release-graph', root));
    const form = releaseForm(root);
    let alive = true;
    return {
      root,
      async refresh() {
        const services = await getJson('/api/v1/services');
        const releases = await getJson('/api/v1/releases');
        const rollouts = await getJson('/api/v1/rollouts');
        if (!alive) return;
        const byId = new Map(rollouts.map((r) => [r.id, r]));
        graph.update(services, byId);
        renderReleases(root, releases, byId);
        form.update(services);
      },
      syncAuth: () => form.syncAuth(),
      resize: () => graph.drawEdges(),
      unmount() {
        alive = false;
      },
    };
  }

  /** Each service's column: 0 for a service that waits for nothing, else one more than the
   * deepest service it waits for. */
  function dependencyDepths(services) {
    const byName = new Map(services.map((s) => [s.name, s]));
    const depth = new Map();
    const visiting = new Set();
    const visit = (name) => {
      if (depth.has(name)) return depth.get(name);
      if (visiting.has(name)) return 0; // a cycle (the controller refuses them): stop here
      visiting.add(name);
      let d = 0;
      for (const dep of byName.get(name).depends_on || []) {
        if (byName.has(dep)) d = Math.max(d, visit(dep) + 1);
      }
      visiting.delete(name);
      depth.set(name, d);
      return d;
    };
    for (const s of services) visit(s.name);
    return depth;
  }

  function serviceGraph(container) {
    const columns = $('.graph-columns', container);
    const svg = $('svg.graph-edges', container);
    const nodes = new Map();
    let services = [];
    let shape = null;

    function layOut() {
      const depths = dependencyDepths(services);
      const count = Math.max(0, ...depths.values()) + 1;
      const cols = Array.from({ length: count }, (_, i) =>
        el('div', { class: 'graph-column', 'data-depth': i }));
      nodes.clear();
      for (const s of services) {
        const node = serviceNode(s);
        nodes.set(s.name, node);
        cols[depths.get(s.name)].append(node);
      }
      columns.replaceChildren(...cols);
    }

    function update(list, rolloutsById) {
      services = list;
      const nextShape = JSON.stringify(list.map((s) => [s.name, s.depends_on]));
      if (nextShape !== shape) {
        shape = nextShape;
        layOut();
      }
      for (const s of list) fillServiceNode(nodes.get(s.name), s, rolloutsById.get(s.rollout));
      drawEdges();
    }

    function drawEdges() {
      svg.setAttribute('width', columns.offsetLeft + columns.offsetWidth);
      svg.setAttribute('height', columns.offsetTop + columns.offsetHeight);
      const paths = [arrowDefs()];
      for (const s of services) {
        for (const dep of s.depends_on || []) {
          const from = nodes.get(dep);
          const to = nodes.get(s.name);
          if (from && to) paths.push(edgePath(container, from, to, s.phase === 'pending'));
        }
      }
      svg.replaceChildren(...paths);
    }

    return { update, drawEdges };
  }

  function arrowDefs() {
    const marker = svgEl('marker', {
      id: 'graph-arrow', viewBox: '0 0 10 10', refX: 9, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse',
    });
    marker.append(svgEl('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrow-head' }));
    const defs = svgEl('defs');
    defs.append(marker);
    return defs;
  }

  /** A curve from the right edge of `from` (the dependency) to the left edge of `to`. */
  function edgePath(container, from, to, waiting) {
    const box = container.getBoundingClientRect();
    const a = from.getBoundingClientRect();
    const b = to.getBoundingClientRect();
    const left = box.left - container.scrollLeft;
    const top = box.top - container.scrollTop;
    const x1 = a.right - left;
    const y1 = a.top + a.height / 2 - top;
    const x2 = b.left - left - 2;
    const y2 = b.top + b.height / 2 - top;
    const mid = (x1 + x2) / 2;
    return svgEl('path', {
      d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`,
      class: waiting ? 'edge waiting' : 'edge',
      'marker-end': 'url(#graph-arrow)',
    });
  }

  function serviceNode(s) {
    return el('div', { class: 'service-node', 'data-service': s.name, 'data-phase': '' },
      el('div', { class: 'node-head' },
        el('span', { class: 'node-name', text: s.name }),
        el('span', { class: 'node-version' })),
      el('div', { class: 'node-body' },
        el('span', { class: 'phase-badge' }),
        el('span', { class: 'node-flags hint' })),
      el('div', { class: 'node-link' }));
  }

  function fillServiceNode(node, s, rollout) {
    const phase = s.phase || '';
    node.dataset.phase = phase;
    setText($('.node-version', node), s.version);
    const badge = $('.phase-badge', node);
    badge.dataset.phase = phase;
    setText(badge, phase ? phaseText(phase, rollout && rollout.step) : 'no rollout');
    setText($('.node-flags', node), s.requires_approval ? 'approval required' : '');
    const slot = $('.node-link', node);
    let link = $('a.rollout-link', slot);
    if (s.rollout === null || s.rollout === undefined) {
      if (link) link.remove();
      return;
    }
    if (!link) {
      link = el('a', { class: 'rollout-link' });
      slot.append(link);
    }
    link.setAttribute('href', `#/rollouts/${s.rollout}`);
    const target = rollout ? `: ${rollout.from_version} → ${rollout.to_version}` : '';
    setText(link, `rollout #${s.rollout}${target}`);
  }

  function phaseText(phase, step) {
    return typeof step === 'number' ? `${phase} · step ${step}` : phase;
  }

  const RELEASES_SHOWN = 40;

  function renderReleases(root, releases, rolloutsById) {
    const list = $('#releases', root);
    const newest = releases.slice().sort((a, b) => (b.created_ms - a.created_ms) || (b.id - a.id));
    const shown = newest.slice(0, RELEASES_SHOWN);
    const signature = JSON.stringify([releases.length, shown.map((r) => [r.id, r.finished,
      r.rollouts.map((id) => { const v = rolloutsById.get(id); return v ? [v.phase, v.step] : null; })])]);
    $('.empty-note[data-for="releases"]', root).hidden = releases.length > 0;
    replaceIfChanged(list, signature, () => {
      const items = shown.map((r) => releaseItem(r, rolloutsById));
      if (newest.length > shown.length) {
        items.push(el('li', { class: 'hint', text: `${newest.length - shown.length} older releases not shown` }));
      }
      return items;
    });
  }

  function releaseItem(release, rolloutsById) {
    const chips = release.rollouts.map((id) => {
      const r = rolloutsById.get(id);
      const phase = r ? r.phase : '';
      return el('li', {},
        el('a', { class: 'rollout-chip', href: `#/rollouts/${id}`, 'data-phase': phase },
          r ? `${r.service} ${r.from_version} → ${r.to_version}` : `rollout #${id}`,
          el('span', { class: 'phase-badge', 'data-phase': phase, text: r ? phaseText(phase, r.step) : '?' })));
    });
    return el('li', { class: 'release', 'data-id': release.id, 'data-finished': release.finished ? 'yes' : 'no' },
      el('div', { class: 'release-head' },
        el('strong', { text: `Release #${release.id}` }),
        el('span', { class: 'hint', text: `started ${fmtWhen(release.created_ms)}` }),
        el('span', { class: release.finished ? 'tag' : 'tag tag-live', text: release.finished ? 'finished' : 'in progress' }),
        release.rollback_on_failure ? el('span', { class: 'tag', text: 'rollback on failure' }) : null),
      el('ul', { class: 'release-rollouts' }, chips));
  }

  function releaseForm(root) {
    const form = $('#release-form', root);
    const rows = $('.release-services', form);
    const button = $('#release-button', form);
    let shape = null;

    function update(services) {
      const nextShape = JSON.stringify(services.map((s) => [s.name, s.version, s.versions, s.rollout]));
      if (nextShape === shape) return;
      shape = nextShape;
      const chosen = new Map($$('select.release-version', rows)
        .filter((select) => select.dataset.touched === '1')
        .map((select) => [select.dataset.service, select.value]));
      rows.replaceChildren(...services.map((s, i) => versionRow(s, i, chosen.get(s.name))));
    }

    function versionRow(s, i, chosen) {
      const id = `release-version-${i}`;
      const select = el('select', { id, class: 'release-version', 'data-service': s.name, 'data-current': s.version });
      const versions = s.versions && s.versions.length ? s.versions : [s.version];
      for (const v of versions) {
        select.append(el('option', { value: v, text: v === s.version ? `${v} (current)` : v }));
      }
      select.value = chosen !== undefined && versions.includes(chosen) ? chosen : s.version;
      if (chosen !== undefined) select.dataset.touched = '1';
      markChanged(select);
      return el('div', { class: 'release-row' },
        el('label', { for: id, text: s.name }),
        select,
        el('span', { class: 'hint', text: s.rollout !== null && s.rollout !== undefined ? `rollout #${s.rollout} open` : '' }));
    }

    function markChanged(select) {
      select.classList.toggle('changed', select.value !== select.dataset.current);
    }

    rows.addEventListener('change', (event) => {
      if (!event.target.matches('select.release-version')) return;
      event.target.dataset.touched = '1';
      markChanged(event.target);
    });

    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      const services = {};
      for (const select of $$('select.release-version', rows)) {
        if (select.value !== select.dataset.current) services[select.dataset.service] = select.value;
      }
      if (Object.keys(services).length === 0) {
        showError('start release', null, 'no version changed: pick another version for at least one service');
        return;
      }
      const body = { services, rollback_on_failure: $('#release-rollback-on-failure', form).checked };
      const answer = await withBusy(button, () => act('start release', '/api/v1/releases', body));
      if (!answer) return;
      showNotice(`release #${answer.release} started`);
      shape = null; // the selects go back to the current versions
      for (const select of $$('select.release-version', rows)) delete select.dataset.touched;
      poll();
    });

    function syncAuth() {
      setEnabled(button, signedIn(), 'Sign in with the admin token to start a release');
    }

    return { update, syncAuth };
  }

  // ---------------------------------------------------------------- rollout page

  function rolloutView(id) {
    const root = cloneTemplate('tpl-rollout');
    const charts = { latency: chartHolder($('#latency-chart', root)), evidence: chartHolder($('#evidence-chart', root)) };
    const path = `/api/v1/rollouts/${encodeURIComponent(id)}`;
    let detail = null;
    let alive = true;

    wireRolloutActions(root, path, () => detail, (next) => {
      detail = next;
      renderRollout(root, detail);
    });

    return {
      root,
      async refresh() {
        const answer = await request('GET', path);
        if (answer.status === 404 || answer.status === 400) {
          if (alive) showMissingRollout(root, id, errorText(answer));
          return;
        }
        if (!answer.ok) throw readFailed(path, answer);
        const chartData = await getOptional('charts', `${path}/charts`, '/api/v1/rollouts/{id}/charts');
        if (!alive) return;
        detail = answer.data;
        renderRollout(root, detail);
        renderCharts(root, charts, chartData);
        renderNumbers(root, detail, chartData);
      },
      syncAuth: () => renderActions(root, detail),
      resize() {
        charts.latency.resize();
        charts.evidence.resize();
      },
      unmount() {
        alive = false;
        charts.latency.destroy();
        charts.evidence.destroy();
      },
    };
  }

  function showMissingRollout(root, id, error) {
    const missing = $('.r-missing', root);
    setText(missing, `No rollout ${id}: ${error}`);
    missing.hidden = false;
    setText($('.r-title', root), `Rollout ${id}`);
    root.dataset.missing = 'yes';
  }

  function renderRollout(root, d) {
    delete root.dataset.missing;
    $('.r-missing', root).hidden = true;
    renderRolloutHead(root, d);
    renderVerdict(root, d);
    renderActions(root, d);
    renderEvidence(root, d);
    renderFields(root, d);
    renderApprovals(root, d);
    renderTransitions(root, d.transitions || []);
  }

  function renderRolloutHead(root, d) {
    setText($('.r-release', root), `release #${d.release}`);
    setText($('.r-title', root), `Rollout #${d.id}: ${d.service} ${d.from_version} → ${d.to_version}`);
    const phase = $('#rollout-phase', root);
    setText(phase, d.phase);
    phase.dataset.phase = d.phase;
    setText($('#rollout-step', root), typeof d.step === 'number' ? `step ${d.step}` : '');
    setText($('.r-since', root), `since ${fmtWhen(d.entered_ms)} (${fmtDuration(Date.now() - d.entered_ms)})`);
    const machines = d.machines || {};
    const facts = [
      ['created', fmtWhen(d.created_ms)],
      ['waits for', (d.after || []).join(', ') || 'nothing'],
      ['approval', d.requires_approval ? 'required' : 'not required'],
      ['replaced', (machines.replaced || []).join(', ') || '—'],
      ['joining', (machines.joining || []).join(', ') || '—'],
      ['sub-group', machines.subgroup ? JSON.stringify(machines.subgroup) : 'whole service'],
      ['jobs', fmtNum(d.numbers && d.numbers.jobs)],
    ];
    const dl = $('.r-facts', root);
    replaceIfChanged(dl, JSON.stringify(facts), () => facts.map(([k, v]) =>
      el('div', { class: 'fact' }, el('dt', { text: k }), el('dd', { text: v }))));
  }

  function renderVerdict(root, d) {
    const v = d.verdict;
    const decision = $('#rollout-decision', root);
    setText(decision, v ? v.decision : 'none yet');
    decision.dataset.decision = v ? v.decision : '';
    setText($('.r-hard', root), v && v.hard ? '(a hard limit)' : '');
    setText($('#rollout-rule', root), v ? v.rule : '');
    const baseline = v && v.baseline ? `Baseline: ${v.baseline}${v.baseline_note ? ` (${v.baseline_note})` : ''}.` : '';
    setText($('.r-baseline', root), baseline);
    const problem = $('.r-problem', root);
    setText(problem, d.problem || '');
    problem.hidden = !d.problem;
  }

  function renderActions(root, d) {
    const approve = $('#approve-button', root);
    const abort = $('#abort-button', root);
    const rollback = $('#rollback-button', root);
    if (!d) return;
    const auth = signedIn();
    const signInFirst = (what) => `Sign in with the admin token to ${what}`;
    setEnabled(approve, auth && d.phase === 'awaiting_approval',
      auth ? `Only a rollout awaiting approval can be approved (this one is ${d.phase})` : signInFirst('approve'));
    setEnabled(abort, auth && !FINISHED.has(d.phase),
      auth ? `The rollout is finished (${d.phase}): nothing to abort` : signInFirst('abort'));
    setEnabled(rollback, auth && !ROLLBACK_REFUSED.has(d.phase),
      auth ? `The rollout is already ${d.phase}` : signInFirst('roll back'));
    const hint = !auth ? 'Read-only: sign in with the admin token to act on this rollout.'
      : d.phase === 'awaiting_approval' ? `Approving sends the evidence id shown (${d.evidence ? d.evidence.id : 'none'}).` : '';
    setText($('.r-action-hint', root), hint);
  }

  function wireRolloutActions(root, path, getDetail, setDetail) {
    const send = async (button, what, action, body) => {
      const answer = await withBusy(button, () => act(what, `${path}/${action}`, body));
      if (!answer) return;
      if (answer.id !== undefined && answer.phase) setDetail(answer);
      showNotice(`${what} accepted: rollout #${answer.id} is ${answer.phase}`);
      poll();
    };
    $('#approve-button', root).addEventListener('click', (event) => {
      // The evidence id as displayed: the controller refuses it if the evidence changed since.
      const shown = $('#evidence-id', root).textContent;
      const d = getDetail();
      send(event.currentTarget, 'approve', 'approve', d && d.evidence && shown ? { evidence: shown } : {});
    });
    $('#abort-button', root).addEventListener('click', (event) => send(event.currentTarget, 'abort', 'abort', {}));
    $('#rollback-button', root).addEventListener('click', (event) => send(event.currentTarget, 'roll back', 'rollback', {}));
  }

  function renderEvidence(root, d) {
    const state = $('.r-evidence-state', root);
    const table = $('#evidence-tests', root);
    const ev = d.evidence;
    if (!('evidence' in d) || !ev) {
      setText($('#evidence-id', root), '');
      setText($('.r-evidence-meta', root), '');
      setText(state, 'evidence' in d ? 'No evidence yet.' : 'Not available: this controller does not report evidence.');
      table.hidden = true;
      return;
    }
    setText($('#evidence-id', root), ev.id);
    setText($('.r-evidence-meta', root), `at ${fmtWhen(ev.at_ms)}, ${fmtNum(ev.jobs)} jobs, decision ${ev.decision}`);
    const expiry = typeof d.approval_expires_ms === 'number'
      ? `An evidence id may be approved up to ${fmtDuration(d.approval_expires_ms)} after it was shown.` : '';
    setText(state, expiry);
    table.hidden = false;
    const tests = ev.tests || [];
    replaceIfChanged($('tbody', table), JSON.stringify(tests), () => tests.map((t) =>
      el('tr', { 'data-evidence': t.evidence },
        el('td', { text: t.name }),
        el('td', { class: 'num', text: fmtNum(t.estimate, 4) }),
        el('td', { class: 'num', text: fmtNum(t.margin, 4) }),
        el('td', { class: 'num', text: fmtInterval(t.interval, (x) => fmtNum(x, 4)) }),
        el('td', { text: t.beyond_margin ? 'yes' : 'no' }),
        el('td', {}, el('span', { class: 'evidence-badge', 'data-evidence': t.evidence, text: t.evidence })))));
  }

  // The fields where copies' answers differ (compare = "fields"): regressions and noise, with
  // a sample of the values; the table is made on first use, after the evidence table.
  function renderFields(root, d) {
    let box = $('.r-fields', root);
    const fields = (d.fields && d.fields.fields) || [];
    const shown = fields.filter((f) => f.class === 'regression' || f.class === 'noise');
    if (!box) {
      if (!shown.length) return;
      box = el('div', { class: 'r-fields' },
        el('h3', { text: 'Fields' }),
        el('p', { class: 'r-fields-summary hint' }),
        el('table', { id: 'fields', class: 'data' },
          el('thead', {}, el('tr', {},
            el('th', { text: 'field' }), el('th', { text: 'class' }),
            el('th', { class: 'num', text: 'v2 differs' }), el('th', { class: 'num', text: 'control differs' }),
            el('th', { text: 'sample (v1 → copy)' }))),
          el('tbody')));
      $('#evidence-tests', root).after(box);
    }
    const others = fields.length - shown.length;
    setText($('.r-fields-summary', box),
      `${fmtNum(d.fields.jobs)} jobs compared field by field (${fmtNum(d.fields.control_jobs)} with the control)` +
      (others > 0 ? `; ${others} other field(s) ok or open` : ''));
    const value = (v) => (v === null || v === undefined ? 'absent' : v);
    const sample = (f) => {
      const s = f.class === 'regression' ? f.v2_sample : (f.control_sample || f.v2_sample);
      return s ? `${value(s.v1)} → ${value(s.copy)}` : '';
    };
    replaceIfChanged($('tbody', box), JSON.stringify(shown), () => shown.map((f) =>
      el('tr', { 'data-class': f.class },
        el('td', {}, el('code', { text: f.path })),
        el('td', {}, el('span', { class: 'evidence-badge', 'data-evidence': f.class === 'regression' ? 'fail' : 'open', text: f.class })),
        el('td', { class: 'num', text: fmtRate(f.v2_rate) }),
        el('td', { class: 'num', text: f.control_rate === null ? '—' : fmtRate(f.control_rate) }),
        el('td', {}, el('code', { text: sample(f) })))));
  }

  function renderApprovals(root, d) {
    const summary = $('.r-approvals-summary', root);
    const list = $('#approvals', root);
    if (!('approvals_required' in d)) {
      setText(summary, d.requires_approval ? 'Not available: this controller does not report approvals.' : 'No approval needed.');
      list.replaceChildren();
      return;
    }
    const approvals = d.approvals || [];
    const needed = d.approvals_required;
    const text = !d.requires_approval ? 'No approval needed.'
      : `${needed} approval${needed === 1 ? '' : 's'} required; ${approvals.length} recorded` +
        (approvals.length > 0 && approvals.length < needed ? ': another operator must approve.' : '.');
    setText(summary, text);
    const now = Date.now();
    replaceIfChanged(list, JSON.stringify([approvals, Math.floor(now / 1000)]), () => approvals.map((a) => {
      const expired = typeof a.expires_at_ms === 'number' && a.expires_at_ms < now;
      return el('li', { class: expired ? 'expired' : '' },
        el('strong', { text: a.operator }),
        ` at ${fmtWhen(a.at_ms)} for evidence `,
        el('code', { text: a.evidence }),
        typeof a.expires_at_ms === 'number' ? ` (${expired ? 'expired' : 'expires'} ${fmtWhen(a.expires_at_ms)})` : '');
    }));
  }

  function renderTransitions(root, transitions) {
    const body = $('#transitions tbody', root);
    replaceIfChanged(body, JSON.stringify(transitions.map((t) => [t.at_ms, t.from, t.to, t.cause, t.actor, t.operator])),
      () => transitions.map((t) => el('tr', { class: 'transition' },
        el('td', { class: 'time', text: fmtWhen(t.at_ms) }),
        el('td', { class: 'change' },
          el('span', { class: 'phase-badge', 'data-phase': phaseKey(t.from), text: t.from }),
          ' → ',
          el('span', { class: 'phase-badge', 'data-phase': phaseKey(t.to), text: t.to })),
        el('td', { class: 'cause', text: t.cause }),
        el('td', { class: 'actor', text: t.actor }),
        el('td', { class: 'operator', text: t.operator || '' }))));
  }

  /** `joining[1]` -> `joining`, `judged(pass)` -> `judged`: the phase a history label names. */
  function phaseKey(label) {
    return String(label || '').replace(/[[(].*$/, '');
  }

  // ---------------------------------------------------------------- rollout numbers (tables)

  function renderNumbers(root, d, charts) {
    const data = charts.available && charts.data ? charts.data : null;
    renderQuantiles(root, d, data);
    renderRates(root, d, data);
    renderTraffic(root, d, data);
    setText($('.r-rule', root), data && data.rule ? `Condition: ${data.rule}` : '');
  }

  function renderQuantiles(root, d, data) {
    let rows;
    if (data && Array.isArray(data.quantiles)) {
      setText($('.r-quantiles-source', root), 'v2 against v1, with the judge\'s interval for the ratio.');
      rows = data.quantiles.map((q) => ({
        name: q.name, v1: q.v1_us, v2: q.v2_us, control: q.control_us, ratio: q.ratio, interval: q.interval, limit: q.max_ratio,
      }));
    } else {
      setText($('.r-quantiles-source', root), 'Charts not available: the rollout\'s display numbers, without intervals.');
      const n = d.numbers || {};
      const v1 = n.v1 || {};
      const v2 = n.v2 || {};
      rows = [['p50', 'p50_us'], ['p99', 'p99_us'], ['p99.9', 'p999_us']].map(([name, key]) => ({
        name, v1: v1[key], v2: v2[key], ratio: v1[key] > 0 && typeof v2[key] === 'number' ? v2[key] / v1[key] : null,
      }));
    }
    replaceIfChanged($('#quantiles tbody', root), JSON.stringify(rows), () => rows.map((q) => {
      const over = typeof q.limit === 'number' && typeof q.ratio === 'number' && q.ratio > q.limit;
      return el('tr', { class: over ? 'quantile over' : 'quantile', 'data-quantile': q.name },
        el('th', { scope: 'row', text: q.name }),
        el('td', { class: 'num', text: fmtUs(q.v1) }),
        el('td', { class: 'num', text: fmtUs(q.v2) }),
        el('td', { class: 'num', text: fmtUs(q.control) }),
        el('td', { class: 'num ratio', text: fmtNum(q.ratio) }),
        el('td', { class: 'num', text: fmtInterval(q.interval) }),
        el('td', { class: 'num', text: fmtNum(q.limit) }));
    }));
  }

  function renderRates(root, d, data) {
    const n = d.numbers || {};
    const r = data && data.rates ? data.rates : null;
    // No control pair at all: the control's rates are not zero, they are unknown.
    const noControl = data && data.traffic && data.traffic.control_pairs === 0;
    const control = (v) => (noControl ? null : v);
    const rows = r
      ? [['errors', r.v1_error_rate, r.v2_error_rate, control(r.control_error_rate)],
        ['mismatches with v1', null, r.mismatch_rate, control(r.control_mismatch_rate)]]
      : [['errors', n.v1 && n.v1.error_rate, n.v2 && n.v2.error_rate, n.control_jobs > 0 ? n.control_error_rate : null],
        ['mismatches with v1', null, n.mismatch_rate, null]];
    replaceIfChanged($('#rates tbody', root), JSON.stringify(rows), () => rows.map(([name, ...values]) =>
      el('tr', {}, el('th', { scope: 'row', text: name }),
        values.map((v) => el('td', { class: 'num', text: fmtRate(v) })))));
  }

  function renderTraffic(root, d, data) {
    const t = data && data.traffic ? data.traffic : null;
    const n = d.numbers || {};
    const facts = t
      ? [['mirrored copies', t.copies], ['judged pairs', t.pairs], ['control pairs', t.control_pairs],
        ['mirror dropped', t.mirror_dropped], ['pairs lost', t.pairs_lost], ['not mirrored', t.not_mirrored]]
      : [['jobs', n.jobs], ['compared pairs', n.compared], ['control jobs', n.control_jobs]];
    setText($('.r-traffic-state', root), t ? '' : 'Charts not available: mirroring counters are not reported by this controller.');
    replaceIfChanged($('#traffic', root), JSON.stringify(facts), () =>
      facts.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { class: 'num', text: fmtNum(v) })]));
  }

  // ---------------------------------------------------------------- charts (uPlot)

  /** One uPlot chart in `container`, made once and fed new data with setData; made again only
   * when its series change (another set of tests). */
  function chartHolder(container) {
    let plot = null;
    let shape = null;
    const width = () => Math.max(280, container.clientWidth || 600);
    return {
      draw(nextShape, makeOptions, data) {
        if (!plot || nextShape !== shape) {
          if (plot) plot.destroy();
          plot = new uPlot(makeOptions(width(), CHART_HEIGHT), data, container);
          shape = nextShape;
        } else {
          plot.setData(data);
        }
      },
      resize() {
        if (plot) plot.setSize({ width: width(), height: CHART_HEIGHT });
      },
      destroy() {
        if (plot) plot.destroy();
        plot = null;
      },
    };
  }

  function chartStatus(root, id, text) {
    setText($(`.chart-status[data-for="${id}"]`, root), text);
  }

  function renderCharts(root, charts, answer) {
    if (typeof uPlot !== 'function') {
      chartStatus(root, 'latency-chart', 'Chart library not loaded.');
      chartStatus(root, 'evidence-chart', 'Chart library not loaded.');
      return;
    }
    if (!answer.available || !answer.data) {
      const text = 'Not available: this controller does not serve chart data.';
      chartStatus(root, 'latency-chart', text);
      chartStatus(root, 'evidence-chart', text);
      return;
    }
    drawLatency(root, charts.latency, answer.data.latency);
    drawEvidence(root, charts.evidence, answer.data.evidence);
  }

  function drawLatency(root, chart, latency) {
    const container = $('#latency-chart', root);
    const prepared = latency && Array.isArray(latency.bounds_us) ? latencyData(latency) : null;
    if (!prepared) {
      chartStatus(root, 'latency-chart', 'No latency histogram in the chart data.');
      return;
    }
    chart.draw('latency', latencyOptions, prepared.data);
    container.dataset.points = String(prepared.points);
    const totals = ['v1', 'v2', 'control'].map((k) => `${k} ${fmtNum(prepared.totals[k])}`).join(' · ');
    chartStatus(root, 'latency-chart', prepared.points === 0 ? 'No latency sample yet.' : `Jobs per series: ${totals}.`);
  }

  /** uPlot's columns for the histograms: x = bucket edges, y = each series' share of its jobs per
   * bucket (so series of different sizes compare), drawn as steps from each edge to the next. */
  function latencyData(latency) {
    const bounds = latency.bounds_us.map(Number);
    const longest = Math.max(0, ...['v1', 'v2', 'control'].map((k) => (latency[k] || []).length));
    // Counts with an overflow bucket past the last edge: one more edge, a bucket as wide.
    while (bounds.length > 1 && bounds.length <= longest) {
      const n = bounds.length;
      bounds.push(bounds[n - 1] * (bounds[n - 1] / bounds[n - 2] || 2));
    }
    if (bounds.length < 2) return null;
    if (!(bounds[0] > 0)) bounds[0] = bounds[1] / 2; // a log axis has no zero
    const buckets = bounds.length - 1;
    let points = 0;
    const totals = {};
    const series = ['v1', 'v2', 'control'].map((key) => {
      const counts = (latency[key] || []).slice(0, buckets).map((c) => Number(c) || 0);
      const total = counts.reduce((a, b) => a + b, 0);
      totals[key] = total;
      const ys = new Array(buckets + 1).fill(0);
      counts.forEach((c, i) => {
        if (c > 0) points += 1;
        ys[i] = total > 0 ? (100 * c) / total : 0;
      });
      return ys; // the last value (0) closes the last bucket at its upper edge
    });
    return { data: [bounds, ...series], points, totals };
  }

  function latencyOptions(width, height) {
    const stepped = uPlot.paths.stepped({ align: 1 });
    const histogram = (label, color, dash) => ({
      label,
      stroke: color,
      fill: withAlpha(color, 0.12),
      width: 1.5,
      dash,
      paths: stepped,
      points: { show: false },
      value: (u, v) => (v === null || v === undefined ? '—' : `${v.toFixed(1)}%`),
    });
    return {
      width,
      height,
      cursor: { drag: { x: false, y: false } },
      scales: {
        x: { time: false, distr: 3, log: 10 },
        y: { range: (u, min, max) => [0, Math.max(1, max || 0) * 1.08] },
      },
      axes: [
        { label: 'latency (bucket lower edge)', splits: (u, i, min, max) => logSplits(min, max, [1, 2, 5]), values: (u, splits) => splits.map(tick(fmtUs)) },
        { label: '% of jobs', size: 56, values: (u, splits) => splits.map((v) => `${trim(v, 1)}%`) },
      ],
      series: [
        { label: 'latency ≥', value: (u, v) => (v === null || v === undefined ? '—' : fmtUs(v)) },
        histogram('v1', COLORS.v1),
        histogram('v2', COLORS.v2),
        histogram('A/A control', COLORS.control, [5, 3]),
      ],
    };
  }

  /** A tick label: uPlot hands a log axis' labels that do not fit as null. */
  function tick(format) {
    return (v) => (v === null || v === undefined ? '' : format(v));
  }

  /** Ticks (and grid lines) of a log axis: each of `mantissas` times each power of ten within
   * [min, max], every second or third decade only when there are many. */
  function logSplits(min, max, mantissas) {
    if (!(min > 0) || !(max > min)) return [];
    const first = Math.floor(Math.log10(min));
    const last = Math.ceil(Math.log10(max));
    const decades = last - first;
    const every = mantissas.length > 1 ? 1 : Math.max(1, Math.ceil(decades / 8));
    const splits = [];
    for (let k = first; k <= last; k += 1) {
      if ((k - first) % every !== 0) continue;
      for (const m of mantissas) {
        const v = m * 10 ** k;
        if (v >= min * 0.999 && v <= max * 1.001) splits.push(v);
      }
    }
    return splits;
  }

  function drawEvidence(root, chart, evidence) {
    const container = $('#evidence-chart', root);
    if (!evidence || !Array.isArray(evidence.jobs)) {
      chartStatus(root, 'evidence-chart', 'No evidence series in the chart data.');
      return;
    }
    const prepared = evidenceData(evidence);
    chart.draw(prepared.shape, (width, height) => evidenceOptions(width, height, prepared), prepared.data);
    container.dataset.points = String(evidence.jobs.length);
    chartStatus(root, 'evidence-chart', evidence.jobs.length === 0 ? 'No judged window yet.' : '');
  }

  /** Columns: jobs, then each test's fail and pass e-values (non-positive values left out: the
   * axis is logarithmic), then one flat line per distinct threshold. */
  function evidenceData(evidence) {
    const xs = evidence.jobs.map(Number);
    const tests = Array.isArray(evidence.tests) ? evidence.tests : [];
    const positive = (v) => (typeof v === 'number' && v > 0 ? v : null);
    const distinct = (values) => [...new Set(values.filter((v) => typeof v === 'number' && v > 0))];
    const failThresholds = distinct(tests.map((t) => t.fail_threshold));
    const passThresholds = distinct(tests.map((t) => t.pass_threshold));
    const data = [xs];
    for (const t of tests) {
      data.push(xs.map((_, i) => positive((t.fail || [])[i])));
      data.push(xs.map((_, i) => positive((t.pass || [])[i])));
    }
    for (const v of [...failThresholds, ...passThresholds]) data.push(xs.map(() => v));
    const names = tests.map((t) => String(t.name));
    return { data, names, failThresholds, passThresholds, shape: JSON.stringify([names, failThresholds, passThresholds]) };
  }

  function evidenceOptions(width, height, prepared) {
    const series = [{ label: 'jobs', value: (u, v) => (v === null || v === undefined ? '—' : fmtNum(v)) }];
    const eValue = (u, v) => (v === null || v === undefined ? '—' : fmtE(v));
    prepared.names.forEach((name, i) => {
      const color = TEST_COLORS[i % TEST_COLORS.length];
      series.push({ label: `${name} fail`, stroke: color, width: 2, value: eValue, points: { show: false } });
      series.push({ label: `${name} pass`, stroke: color, width: 2, dash: [6, 4], value: eValue, points: { show: false } });
    });
    for (const v of prepared.failThresholds) {
      series.push({ label: `fail threshold ${fmtE(v)}`, stroke: FAIL_LINE, width: 1, dash: [2, 3], value: eValue, points: { show: false } });
    }
    for (const v of prepared.passThresholds) {
      series.push({ label: `pass threshold ${fmtE(v)}`, stroke: PASS_LINE, width: 1, dash: [2, 3], value: eValue, points: { show: false } });
    }
    return {
      width,
      height,
      cursor: { drag: { x: false, y: false } },
      scales: {
        x: { time: false },
        y: { distr: 3, log: 10, range: logRange },
      },
      axes: [
        { label: 'jobs', values: (u, splits) => splits.map((v) => fmtNum(v)) },
        { label: 'e-value', size: 56, splits: (u, i, min, max) => logSplits(min, max, [1]), values: (u, splits) => splits.map(tick(fmtE)) },
      ],
      series,
    };
  }

  function logRange(u, min, max) {
    const lo = typeof min === 'number' && min > 0 ? Math.min(min, 0.5) : 0.1;
    const hi = typeof max === 'number' && max > 0 ? Math.max(max, 10) : 1000;
    return uPlot.rangeLog(lo, hi, 10, true);
  }

  function withAlpha(hex, alpha) {
    const n = parseInt(hex.slice(1), 16);
    return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
  }

  // ---------------------------------------------------------------- machines page

  function machinesView() {
    const root = cloneTemplate('tpl-machines');
    const body = $('#machines-table tbody', root);
    const expanded = new Set();
    let machines = [];
    let alive = true;

    body.addEventListener('click', (event) => {
      const toggle = event.target.closest('button.history-toggle');
      if (!toggle) return;
      const id = toggle.dataset.id;
      if (expanded.has(id)) expanded.delete(id);
      else expanded.add(id);
      renderMachines(root, machines, expanded);
    });

    return {
      root,
      async refresh() {
        const list = await getJson('/api/v1/machines');
        if (!alive) return;
        machines = list;
        renderMachines(root, machines, expanded);
      },
      unmount() {
        alive = false;
      },
    };
  }

  function renderMachines(root, machines, expanded) {
    $('.empty-note[data-for="machines-table"]', root).hidden = machines.length > 0;
    const body = $('#machines-table tbody', root);
    replaceIfChanged(body, JSON.stringify([machines, [...expanded]]), () => machines.flatMap((m) => {
      const open = expanded.has(m.id);
      return open ? [machineRow(m, true), machineHistoryRow(m)] : [machineRow(m, false)];
    }));
  }

  function machineRow(m, open) {
    const history = m.history || [];
    return el('tr', { class: 'machine', 'data-id': m.id },
      el('td', {}, el('code', { text: m.id })),
      el('td', { text: m.service }),
      el('td', { text: m.version }),
      el('td', {}, el('code', { text: m.address })),
      el('td', {}, el('span', { class: 'role-badge', 'data-role': m.role || '', text: m.role || '—' })),
      el('td', { text: m.config || '—' }),
      el('td', { text: m.status || '—' }),
      el('td', { class: 'health' },
        el('span', { class: 'health-badge', 'data-health': m.health || 'none', text: m.health || 'not probed' }),
        m.health_reason ? el('div', { class: 'hint reason', text: m.health_reason }) : null),
      el('td', {},
        el('button', {
          type: 'button', class: 'history-toggle link-button', 'data-id': m.id,
          'data-focus-key': `history-${m.id}`, 'aria-expanded': open ? 'true' : 'false',
          text: `${open ? 'hide' : 'show'} (${history.length})`,
        })));
  }

  function machineHistoryRow(m) {
    const history = (m.history || []).slice().reverse();
    const table = el('table', { class: 'data nested' },
      el('thead', {}, el('tr', {}, ['time', 'role', 'version', 'rollout', 'cause'].map((h) => el('th', { text: h })))),
      el('tbody', {}, history.map((h) => el('tr', {},
        el('td', { text: fmtWhen(h.at_ms) }),
        el('td', { text: h.role }),
        el('td', { text: h.version }),
        el('td', {}, h.rollout !== null && h.rollout !== undefined ? el('a', { href: `#/rollouts/${h.rollout}`, text: `#${h.rollout}` }) : '—'),
        el('td', { text: h.cause || '' })))));
    return el('tr', { class: 'machine-history', 'data-id': m.id },
      el('td', { colspan: 9 },
        history.length ? table : el('p', { class: 'hint', text: 'No role change recorded.' })));
  }

  // ---------------------------------------------------------------- start

  async function start() {
    $('#error-dismiss').addEventListener('click', clearError);
    window.addEventListener('hashchange', mount);
    window.addEventListener('resize', onResize);
    document.addEventListener('visibilitychange', onVisibility);
    await loadRoutes();
    setUpSignIn();
    mount();
  }

  start();
})();
