/* learnloop operator console: one static page that talks only to the JSON API (docs/console.md).
 *
 * Layout of this file:
 *   helpers (el, svg, formatting)  ->  api() wrapper and flash  ->  session (login, header)
 *   ->  one render function per page  ->  router.
 *
 * Server data is only ever put into the page as text (textContent, attribute values),
 * never through innerHTML.
 */
'use strict';

(() => {
  const API = '/api/v1';
  const ROLE_RANK = { viewer: 0, reviewer: 1, admin: 2 };
  const COLORS = ['#2563eb', '#dc2626', '#16a34a', '#d97706', '#7c3aed', '#0891b2', '#db2777', '#4b5563'];

  const state = {
    me: null, // {name, role}
    csrf: null,
    token: 0, // bumped on every page render: async work of an old page checks it and stops
    timers: [],
  };

  // ---------------------------------------------------------------- DOM helpers

  /** el('div', {class: 'x', onclick: fn}, 'text', child, [more]) : strings become text nodes. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    if (attrs instanceof Node || typeof attrs !== 'object' || Array.isArray(attrs)) {
      children.unshift(attrs);
    } else {
      setAttrs(node, attrs, false);
    }
    appendChildren(node, children);
    return node;
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    if (attrs instanceof Node || typeof attrs !== 'object' || Array.isArray(attrs)) {
      children.unshift(attrs);
    } else {
      setAttrs(node, attrs, true);
    }
    appendChildren(node, children);
    return node;
  }

  function setAttrs(node, attrs, isSvg) {
    if (!attrs) return;
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class' && !isSvg) node.className = value;
      else if (key === 'dataset') Object.assign(node.dataset, value);
      else if (key === 'text') node.textContent = String(value);
      else if (key.startsWith('on') && typeof value === 'function') node.addEventListener(key.slice(2), value);
      else if (!isSvg && (key === 'value' || key === 'checked' || key === 'hidden' || key === 'disabled')) node[key] = value;
      else node.setAttribute(key, value === true ? '' : String(value));
    }
  }

  function appendChildren(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  function select(attrs, options, value) {
    const node = el('select', attrs, options.map(([v, label]) => el('option', { value: v }, label)));
    node.value = value === undefined || value === null ? '' : String(value);
    if (node.selectedIndex < 0) node.selectedIndex = 0;
    return node;
  }

  // ---------------------------------------------------------------- formatting

  const pad2 = (n) => String(n).padStart(2, '0');

  function toDate(ts) {
    if (ts === null || ts === undefined || ts === '') return null;
    if (typeof ts === 'number') return new Date(ts * 1000);
    if (/^\d+(\.\d+)?$/.test(String(ts))) return new Date(Number(ts) * 1000);
    const d = new Date(ts);
    return Number.isNaN(d.getTime()) ? null : d;
  }

  /** Local "YYYY-MM-DD HH:MM" of unix seconds (or an ISO string). */
  function fmtTime(ts) {
    const d = toDate(ts);
    if (!d) return '';
    return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
  }

  function fmtNum(x, digits = 3) {
    if (x === null || x === undefined || x === '') return '';
    if (typeof x !== 'number') return String(x);
    if (Number.isInteger(x)) return String(x);
    return String(Number(x.toFixed(digits)));
  }

  function fmtPct(x) {
    return typeof x === 'number' ? `${fmtNum(x * 100, 1)}%` : '';
  }

  function fmtValue(v) {
    if (v === null || v === undefined) return '—';
    if (typeof v === 'number') return fmtNum(v);
    if (typeof v === 'boolean') return v ? 'yes' : 'no';
    if (typeof v === 'string') return v;
    return JSON.stringify(v);
  }

  function shortId(id) {
    const s = String(id || '');
    return s.length > 10 ? `${s.slice(0, 8)}…` : s;
  }

  const enc = encodeURIComponent;

  /** Operator names may come as a string or as {name}. */
  function nameOf(who) {
    if (who && typeof who === 'object') return who.name || who.operator || JSON.stringify(who);
    return who === null || who === undefined ? '' : String(who);
  }

  /** A list answer: a bare array, or an object holding one under a usual key. */
  function listOf(data, ...keys) {
    if (Array.isArray(data)) return data;
    if (!data || typeof data !== 'object') return [];
    for (const key of [...keys, 'items', 'entries', 'rows', 'results', 'data']) {
      if (Array.isArray(data[key])) return data[key];
    }
    return [];
  }

  const isPlainObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

  /** An answer (chosen/rejected/completion): one assistant message shows as its bare text. */
  function answerText(value) {
    if (Array.isArray(value) && value.length === 1) return chatText(value[0]);
    return chatText(value);
  }

  /** A message list in chat format (or a string) as plain text. */
  function chatText(value) {
    if (value === null || value === undefined) return '';
    if (typeof value === 'string') return value;
    if (Array.isArray(value)) {
      return value
        .map((m) => (isPlainObject(m) && 'content' in m ? `${m.role ? `${m.role}: ` : ''}${chatText(m.content)}` : chatText(m)))
        .join('\n');
    }
    if (isPlainObject(value) && 'content' in value) return chatText(value.content);
    return JSON.stringify(value);
  }

  // ---------------------------------------------------------------- API and flash

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /** api('GET', '/conversations?rating=up') -> parsed JSON; throws ApiError with the server's message. */
  async function api(method, path, body) {
    const url = path.startsWith('/api/') ? path : API + path;
    const headers = { Accept: 'application/json' };
    const opts = { method, credentials: 'same-origin', headers };
    if (method !== 'GET' && method !== 'HEAD') {
      headers['Content-Type'] = 'application/json';
      if (state.csrf) headers['X-CSRF-Token'] = state.csrf;
      if (body !== undefined) opts.body = JSON.stringify(body);
      else if (method === 'POST') opts.body = '{}';
    }
    let res;
    try {
      res = await fetch(url, opts);
    } catch (err) {
      throw new ApiError(0, 'network', `network error: ${err && err.message ? err.message : err}`);
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (_) {
        data = text;
      }
    }
    if (!res.ok) {
      const e = isPlainObject(data) && isPlainObject(data.error) ? data.error : {};
      const fallback = typeof data === 'string' && data ? data.slice(0, 200) : res.statusText || 'request failed';
      const err = new ApiError(res.status, e.code || `http_${res.status}`, e.message || fallback);
      if (res.status === 401 && url !== `${API}/session` && url !== `${API}/me` && state.me) {
        sessionLost();
      }
      throw err;
    }
    return data;
  }

  let flashTimer = null;

  function flash(message, kind = 'error') {
    const box = $('#flash');
    if (!box) return;
    clearTimeout(flashTimer);
    box.className = `flash flash-${kind}`;
    box.dataset.kind = kind;
    box.title = 'click to dismiss';
    box.textContent = message;
    box.hidden = false;
  }

  function clearFlash() {
    const box = $('#flash');
    if (!box) return;
    box.hidden = true;
    box.textContent = '';
  }

  function showError(err) {
    if (err instanceof ApiError) {
      flash(err.status ? `${err.message} (${err.code}, HTTP ${err.status})` : err.message, 'error');
    } else {
      flash(`error: ${err && err.message ? err.message : err}`, 'error');
      console.error(err); // eslint-disable-line no-console
    }
  }

  /** Run an action (a promise-returning fn): flash its error, or the success message. */
  async function act(button, fn, okMessage) {
    if (button) button.disabled = true;
    try {
      const result = await fn();
      if (okMessage) flash(typeof okMessage === 'function' ? okMessage(result) : okMessage, 'ok');
      return true;
    } catch (err) {
      showError(err);
      return false;
    } finally {
      if (button) button.disabled = false;
    }
  }

  // ---------------------------------------------------------------- session and header

  const can = (role) => Boolean(state.me) && (ROLE_RANK[state.me.role] ?? -1) >= ROLE_RANK[role];

  function setSession(answer) {
    state.me = { name: nameOf(answer.operator), role: String(answer.role || 'viewer') };
    if (answer.csrf_token) state.csrf = answer.csrf_token;
    updateHeader();
  }

  function updateHeader() {
    const bar = $('#topbar');
    if (!state.me) {
      bar.hidden = true;
      return;
    }
    bar.hidden = false;
    $('#whoami').textContent = `${state.me.name} (${state.me.role})`;
    const audit = $('a[data-nav="audit"]');
    if (audit) audit.hidden = !can('admin');
    const section = location.pathname.split('/')[1] || '';
    for (const a of $$('a[data-nav]')) a.classList.toggle('active', a.dataset.nav === section);
  }

  function sessionLost() {
    state.me = null;
    flash('Your session has ended: log in again.', 'error');
    renderLogin();
  }

  function stopTimers() {
    for (const t of state.timers) clearTimeout(t);
    state.timers = [];
  }

  /** A fresh page context: alive() turns false once another page renders. */
  function newContext() {
    stopTimers();
    state.token += 1;
    const token = state.token;
    const ctx = {
      alive: () => token === state.token,
      /** Call fn every ms (after the previous call ended) while the page is open; fn returning false stops it. */
      poll(fn, ms) {
        const tick = async () => {
          if (!ctx.alive()) return;
          let again = true;
          try {
            again = (await fn()) !== false;
          } catch (err) {
            if (!ctx.alive()) return;
            showError(err);
          }
          if (again && ctx.alive()) state.timers.push(setTimeout(tick, ms));
        };
        state.timers.push(setTimeout(tick, ms));
      },
    };
    return ctx;
  }

  function renderLogin() {
    newContext();
    updateHeader();
    const main = $('#main');
    const name = el('input', { id: 'login-name', name: 'name', autocomplete: 'username', required: true });
    const password = el('input', {
      id: 'login-password', name: 'password', type: 'password', autocomplete: 'current-password', required: true,
    });
    const submit = el('button', { id: 'login-submit', type: 'submit' }, 'Log in');
    const form = el(
      'form',
      { id: 'login-form', class: 'login-form' },
      el('h1', {}, 'learnloop console'),
      el('label', { for: 'login-name' }, 'Name'),
      name,
      el('label', { for: 'login-password' }, 'Password'),
      password,
      submit,
    );
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      submit.disabled = true;
      try {
        const answer = await api('POST', '/session', { name: name.value, password: password.value });
        setSession(answer);
        clearFlash();
        route();
      } catch (err) {
        showError(err);
        password.select();
      } finally {
        submit.disabled = false;
      }
    });
    main.replaceChildren(form);
    name.focus();
  }

  async function logout(ev) {
    const button = ev && ev.currentTarget;
    const ok = await act(button, () => api('DELETE', '/session'));
    if (!ok) return;
    state.me = null;
    state.csrf = null;
    history.pushState(null, '', '/login');
    clearFlash();
    renderLogin();
  }

  // ---------------------------------------------------------------- generic tables

  /** A table of rows (arrays of cells); cells are strings or nodes. */
  function table(headers, rows, attrs = {}) {
    return el(
      'table',
      attrs,
      el('thead', {}, el('tr', {}, headers.map((h) => el('th', {}, h)))),
      el('tbody', {}, rows),
    );
  }

  /** Key/value pairs (nested objects become nested tables). */
  function kvTable(obj, attrs = {}) {
    if (!isPlainObject(obj)) return el('p', { class: 'muted' }, fmtValue(obj));
    const keys = Object.keys(obj);
    if (!keys.length) return el('p', { class: 'muted' }, 'none');
    return el(
      'table',
      { class: `kv ${attrs.class || ''}`.trim(), ...attrs },
      el(
        'tbody',
        {},
        keys.map((k) => el('tr', { dataset: { key: k } }, el('th', {}, k), el('td', {}, valueCell(obj[k])))),
      ),
    );
  }

  function valueCell(v) {
    if (isPlainObject(v)) return kvTable(v);
    if (Array.isArray(v) && v.every((x) => typeof x !== 'object' || x === null)) return v.map(fmtValue).join(', ') || '—';
    return fmtValue(v);
  }

  /** Counts: {k: n} as a two-column table, {row: {col: n}} as a matrix. */
  function countTable(obj, attrs = {}) {
    if (!isPlainObject(obj)) return kvTable(obj, attrs);
    const values = Object.values(obj);
    if (values.length && values.every(isPlainObject) && values.every((v) => Object.values(v).every((x) => !isPlainObject(x)))) {
      const cols = [...new Set(values.flatMap((v) => Object.keys(v)))];
      return table(
        ['', ...cols],
        Object.entries(obj).map(([k, v]) => el('tr', { dataset: { key: k } }, el('th', {}, k), cols.map((c) => el('td', { class: 'num' }, fmtValue(v[c]))))),
        { class: `counts ${attrs.class || ''}`.trim() },
      );
    }
    return kvTable(obj, { class: `counts ${attrs.class || ''}`.trim() });
  }

  function emptyNote(text, id = 'empty') {
    return el('p', { id, class: 'empty muted' }, text);
  }

  // ---------------------------------------------------------------- charts (inline SVG)

  /**
   * A line chart: series = [{name, color, points: [{x, y}]}].
   * Axes carry min/max labels; each point has a <title> tooltip.
   */
  function lineChart({ id, cls = 'chart', metric, series, xFmt = fmtNum, yFmt = fmtNum, title = '', width = 560, height = 240 }) {
    const m = { l: 64, r: 16, t: 14, b: 30 };
    const root = svg('svg', {
      id, class: cls, 'data-metric': metric, viewBox: `0 0 ${width} ${height}`, width, height,
      role: 'img', 'aria-label': title, preserveAspectRatio: 'xMidYMid meet',
    });
    const pts = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
    const pw = width - m.l - m.r;
    const ph = height - m.t - m.b;
    root.append(svg('rect', { class: 'plot-bg', x: m.l, y: m.t, width: pw, height: ph }));
    if (!pts.length) {
      root.append(svg('text', { class: 'chart-empty', x: m.l + pw / 2, y: m.t + ph / 2, 'text-anchor': 'middle' }, 'no data yet'));
      return root;
    }
    const xs = pts.map((p) => p.x);
    const ys = pts.map((p) => p.y);
    const xMin = Math.min(...xs), xMax = Math.max(...xs);
    const yMin = Math.min(...ys), yMax = Math.max(...ys);
    let x0 = xMin, x1 = xMax, y0 = yMin, y1 = yMax;
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
    const sx = (x) => m.l + ((x - x0) / (x1 - x0)) * pw;
    const sy = (y) => m.t + ph - ((y - y0) / (y1 - y0)) * ph;

    // grid and axes
    const gridY = [yMin, (yMin + yMax) / 2, yMax];
    for (const g of gridY) root.append(svg('line', { class: 'grid', x1: m.l, x2: m.l + pw, y1: sy(g), y2: sy(g) }));
    root.append(svg('line', { class: 'axis', x1: m.l, x2: m.l, y1: m.t, y2: m.t + ph }));
    root.append(svg('line', { class: 'axis', x1: m.l, x2: m.l + pw, y1: m.t + ph, y2: m.t + ph }));
    root.append(
      svg('text', { class: 'axis-label y-max', x: m.l - 6, y: sy(yMax) + 4, 'text-anchor': 'end' }, yFmt(yMax)),
      svg('text', { class: 'axis-label y-min', x: m.l - 6, y: sy(yMin) + 4, 'text-anchor': 'end' }, yFmt(yMin)),
      svg('text', { class: 'axis-label x-min', x: sx(xMin), y: height - 10, 'text-anchor': xMin === xMax ? 'middle' : 'start' }, xFmt(xMin)),
    );
    if (xMax !== xMin) {
      root.append(svg('text', { class: 'axis-label x-max', x: sx(xMax), y: height - 10, 'text-anchor': 'end' }, xFmt(xMax)));
    }

    for (const s of series) {
      const sp = s.points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y)).sort((a, b) => a.x - b.x);
      if (!sp.length) continue;
      const g = svg('g', { class: 'series', 'data-series': s.name });
      const d = sp.map((p, i) => `${i ? 'L' : 'M'}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(' ');
      g.append(svg('path', { class: 'line', d, fill: 'none', stroke: s.color, 'stroke-width': 2 }));
      for (const p of sp) {
        g.append(
          svg('circle', { class: 'point', cx: sx(p.x).toFixed(1), cy: sy(p.y).toFixed(1), r: sp.length > 60 ? 1.5 : 3, fill: s.color },
            svg('title', {}, `${s.name}: ${yFmt(p.y)} at ${xFmt(p.x)}`)),
        );
      }
      root.append(g);
    }
    return root;
  }

  function legend(series) {
    return el(
      'ul',
      { class: 'legend' },
      series.map((s) => el('li', { class: 'legend-item', dataset: { series: s.name } },
        el('span', { class: 'swatch', style: `background:${s.color}` }), s.name)),
    );
  }

  // ---------------------------------------------------------------- page: conversations

  const FILTER_KEYS = ['rating', 'reaction', 'version', 'channel', 'site', 'since', 'until', 'has_correction', 'flagged', 'q'];
  const CHANNELS = ['websocket', 'widget', 'openai', 'telegram', 'slack', 'webhook'];

  /** "2024-05-01" -> unix seconds of local midnight (endOfDay: 23:59:59 of that day). */
  function dateToUnix(value, endOfDay) {
    const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(value || '');
    if (!m) return null;
    const d = new Date(Number(m[1]), Number(m[2]) - 1, Number(m[3]) + (endOfDay ? 1 : 0));
    return Math.floor(d.getTime() / 1000) - (endOfDay ? 1 : 0);
  }

  async function renderConversations(main, ctx) {
    const params = new URLSearchParams(location.search);
    const f = Object.fromEntries(FILTER_KEYS.map((k) => [k, params.get(k) || '']));

    const rating = select({ id: 'filter-rating', name: 'rating' },
      [['', 'any'], ['up', 'up'], ['down', 'down'], ['none', 'none']], f.rating);
    // implicit feedback: a reply whose customer's next message read as a weak thumbs up or down
    const reaction = select({ id: 'filter-reaction', name: 'reaction' },
      [['', 'any'], ['down', 'weak down ▼'], ['up', 'weak up ▲']], f.reaction);
    const version = el('input', { id: 'filter-version', name: 'version', value: f.version, placeholder: 'e.g. v3', size: 8 });
    const channel = select({ id: 'filter-channel', name: 'channel' },
      [['', 'any'], ...[...new Set([...CHANNELS, ...(f.channel ? [f.channel] : [])])].map((c) => [c, c])], f.channel);
    const site = el('input', { id: 'filter-site', name: 'site', value: f.site, placeholder: 'site, bot or key', size: 12 });
    const since = el('input', { id: 'filter-since', name: 'since', type: 'date', value: f.since });
    const until = el('input', { id: 'filter-until', name: 'until', type: 'date', value: f.until });
    const correction = select({ id: 'filter-correction', name: 'has_correction' },
      [['', 'any'], ['true', 'yes'], ['false', 'no']], f.has_correction);
    const flagged = el('input', { id: 'filter-flagged', name: 'flagged', type: 'checkbox', checked: f.flagged === 'true' });
    const q = el('input', { id: 'search-q', name: 'q', type: 'search', value: f.q, placeholder: 'search message text', size: 24 });
    const apply = el('button', { id: 'filter-apply', type: 'submit' }, 'Apply');
    const reset = el('a', { href: '/conversations', class: 'button-link', id: 'filter-reset' }, 'Reset');

    const field = (label, input) => el('label', { class: 'field' }, el('span', {}, label), input);
    const form = el(
      'form',
      { id: 'filters', class: 'filters' },
      // searching message text is the reviewer's: it searches the raw text (docs/console.md)
      ...(can('reviewer') ? [field('Search', q)] : []), field('Rating', rating), field('Customer wrote', reaction), field('Version', version), field('Channel', channel),
      field('Site', site), field('Since', since), field('Until', until), field('Correction', correction),
      el('label', { class: 'field check' }, flagged, el('span', {}, 'flagged raters only')),
      el('span', { class: 'field actions' }, apply, reset),
    );
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const next = new URLSearchParams();
      const put = (k, v) => { if (v) next.set(k, v); };
      put('q', q.value.trim());
      put('rating', rating.value);
      put('reaction', reaction.value);
      put('version', version.value.trim());
      put('channel', channel.value);
      put('site', site.value.trim());
      put('since', since.value);
      put('until', until.value);
      put('has_correction', correction.value);
      if (flagged.checked) next.set('flagged', 'true');
      const qs = next.toString();
      const url = `/conversations${qs ? `?${qs}` : ''}`;
      if (url === location.pathname + location.search) history.replaceState(null, '', url);
      else history.pushState(null, '', url);
      route();
    });

    const tbody = el('tbody', { id: 'conv-rows' });
    const tbl = el(
      'table',
      { id: 'conversations', class: 'data' },
      el('thead', {}, el('tr', {}, ['Date', 'User', 'Channel', 'Versions', 'Up', 'Down', 'Corr.', 'Flag', 'Msgs', 'First message']
        .map((h) => el('th', {}, h)))),
      tbody,
    );
    const empty = emptyNote('no conversations');
    empty.hidden = true;
    const prev = el('button', { id: 'prev-page', type: 'button', hidden: true }, '← Previous');
    const next = el('button', { id: 'next-page', type: 'button', hidden: true }, 'Next page →');
    const pageInfo = el('span', { id: 'page-info', class: 'muted' });
    main.replaceChildren(el('h1', {}, 'Conversations'), form, tbl, empty, el('div', { class: 'pager' }, prev, pageInfo, next));

    // the API query: the URL's filters with dates turned into unix seconds
    const query = new URLSearchParams();
    for (const k of ['rating', 'reaction', 'version', 'channel', 'site', 'has_correction', ...(can('reviewer') ? ['q'] : [])]) {
      if (f[k]) query.set(k, f[k]);
    }
    if (f.flagged === 'true') query.set('flagged', 'true');
    const sinceTs = dateToUnix(f.since, false);
    const untilTs = dateToUnix(f.until, true);
    if (sinceTs !== null) query.set('since', String(sinceTs));
    if (untilTs !== null) query.set('until', String(untilTs));
    query.set('limit', '50');

    const cursors = []; // cursors of the pages before the current one (null = first page)
    let current = null;

    async function load(cursor) {
      const qs = new URLSearchParams(query);
      if (cursor) qs.set('cursor', cursor);
      const data = await api('GET', `/conversations?${qs}`);
      if (!ctx.alive()) return;
      current = cursor;
      const items = listOf(data);
      tbody.replaceChildren(...items.map(convRow));
      tbl.hidden = items.length === 0;
      empty.hidden = items.length !== 0;
      next.hidden = !(data && data.next_cursor);
      next.dataset.cursor = (data && data.next_cursor) || '';
      prev.hidden = cursors.length === 0;
      pageInfo.textContent = cursors.length || !next.hidden ? `page ${cursors.length + 1}` : '';
    }

    next.addEventListener('click', async () => {
      const cursor = next.dataset.cursor;
      if (!cursor) return;
      cursors.push(current);
      if (!(await act(next, () => load(cursor)))) cursors.pop();
    });
    prev.addEventListener('click', async () => {
      if (!cursors.length) return;
      const cursor = cursors.pop();
      if (!(await act(prev, () => load(cursor)))) cursors.push(cursor);
    });

    await load(null);
  }

  function convRow(c) {
    const versions = Array.isArray(c.versions) ? c.versions.join(', ') : fmtValue(c.versions === undefined ? null : c.versions);
    return el(
      'tr',
      { class: `conv-row${c.flagged ? ' flagged' : ''}`, dataset: { id: c.id } },
      el('td', { class: 'conv-date nowrap', title: c.last_at ? `last message ${fmtTime(c.last_at)}` : null }, fmtTime(c.created_at)),
      el('td', { class: 'conv-user' }, c.user_id || '—'),
      el('td', { class: 'conv-channel' }, c.site ? `${c.channel || ''} · ${c.site}` : c.channel || ''),
      el('td', { class: 'conv-versions' }, versions),
      el('td', { class: 'conv-ups num' }, String(c.ups ?? 0)),
      el('td', { class: 'conv-downs num' }, String(c.downs ?? 0)),
      el('td', { class: 'conv-corrections num' }, String(c.corrections ?? 0)),
      el('td', { class: 'conv-flagged' }, c.flagged ? el('span', { class: 'badge flag', title: 'rated by a rater held for review' }, '⚑ flagged') : ''),
      el('td', { class: 'conv-messages num' }, c.n_messages === undefined ? '' : String(c.n_messages)),
      el('td', { class: 'conv-preview' }, el('a', { href: `/conversations/${enc(c.id)}` }, c.preview || '(no text)')),
    );
  }

  // ---------------------------------------------------------------- page: one conversation

  async function renderConversation(main, ctx, id) {
    const reviewer = can('reviewer');
    const page = {
      sig: null,
      raw: false, // the transcript unredacted (reviewers; audited)
      open: {}, // message id -> 'correct' | 'exclude'
      drafts: {}, // message id -> {text, reason, exclude}
    };

    const title = el('h1', {}, 'Conversation ', el('code', {}, id));
    const meta = el('div', { id: 'conv-meta', class: 'meta' });
    const connected = el('span', { id: 'connected', class: 'badge' }, 'connected: 0');
    const status = el('span', { id: 'takeover-status', class: 'takeover-status' }, '');

    const startBtn = el('button', { id: 'takeover-start', type: 'button', hidden: true }, 'Take over');
    const text = el('textarea', { id: 'takeover-text', rows: 3, placeholder: 'Reply to the customer as operator', hidden: true });
    const sendBtn = el('button', { id: 'takeover-send', type: 'button', class: 'primary', hidden: true }, 'Send reply');
    const stopBtn = el('button', { id: 'takeover-stop', type: 'button', hidden: true }, 'Hand back to the bot');
    const panel = el(
      'section',
      { id: 'takeover-panel', class: 'panel' },
      el('div', { class: 'panel-head' }, el('strong', {}, 'Takeover'), status, connected),
      reviewer ? el('div', { class: 'takeover-actions' }, startBtn, text, el('div', { class: 'row' }, sendBtn, stopBtn)) : null,
    );
    const list = el('div', { id: 'messages', class: 'messages' });
    // personal data is redacted by default; a reviewer may show it, and each look is audited
    const privacyNote = el('span', { id: 'redaction-note', class: 'muted' }, '');
    const rawBtn = el('button', { id: 'raw-toggle', type: 'button', hidden: !reviewer }, 'Show personal data');
    const privacy = el('p', { id: 'redaction', class: 'row' }, privacyNote, rawBtn);
    rawBtn.addEventListener('click', () => act(rawBtn, async () => {
      page.raw = !page.raw;
      await load(true);
    }));

    main.replaceChildren(
      el('p', {}, el('a', { href: '/conversations', class: 'back' }, '← Conversations')),
      title, meta, panel, privacy, list,
    );

    const convPath = `/conversations/${enc(id)}`;

    async function load(force) {
      const data = await api('GET', page.raw ? `${convPath}/raw` : convPath);
      if (!ctx.alive()) return;
      privacyNote.textContent = data.redacted
        ? 'Personal data is redacted ([EMAIL], [PHONE], ...). '
        : 'Showing personal data: this view is recorded in the audit log. ';
      rawBtn.textContent = page.raw ? 'Hide personal data' : 'Show personal data';
      renderMeta(data);
      renderTakeover(data);
      const sig = JSON.stringify(data.messages || []);
      if (force || sig !== page.sig) {
        page.sig = sig;
        renderMessages(data.messages || []);
      }
    }

    function renderMeta(data) {
      const c = data.conversation || {};
      const bits = [];
      if (c.user_id) bits.push(['user', c.user_id]);
      if (c.channel) bits.push(['channel', c.channel]);
      if (c.site) bits.push(['site', c.site]);
      if (c.created_at) bits.push(['started', fmtTime(c.created_at)]);
      if (c.model_version) bits.push(['pinned version', c.model_version]);
      if (c.tenant) bits.push(['tenant', c.tenant]);
      meta.replaceChildren(...bits.map(([k, v]) => el('span', { class: 'meta-item' }, el('span', { class: 'muted' }, `${k}: `), v)));
      connected.textContent = `connected: ${data.connected ?? 0}`;
    }

    function renderTakeover(data) {
      const t = data.takeover;
      if (t) {
        status.textContent = `taken over by ${nameOf(t.operator)}${t.since ? ` since ${fmtTime(t.since)}` : ''}`;
        status.dataset.state = 'active';
      } else {
        status.textContent = 'the bot is answering';
        status.dataset.state = 'inactive';
      }
      if (!reviewer) return;
      startBtn.hidden = Boolean(t);
      text.hidden = !t;
      sendBtn.hidden = !t;
      stopBtn.hidden = !t;
    }

    function renderMessages(messages) {
      // keep what the operator is typing and where the caret is across a re-render
      const active = document.activeElement;
      let focus = null;
      if (active && list.contains(active)) {
        const msg = active.closest('.msg');
        focus = {
          id: msg && msg.dataset.id,
          cls: Array.from(active.classList).find((c) => /^(correction-|exclude-)/.test(c)),
          start: active.selectionStart,
          end: active.selectionEnd,
        };
      }
      const byId = new Map(messages.map((m) => [m.id, m]));
      if (!messages.length) list.replaceChildren(emptyNote('no messages'));
      else list.replaceChildren(...messages.map((m) => messageNode(m, byId)));
      if (focus && focus.id && focus.cls) {
        const target = $$('.msg', list).find((n) => n.dataset.id === focus.id);
        const input = target && $(`.${focus.cls}`, target);
        if (input) {
          input.focus();
          try { input.setSelectionRange(focus.start, focus.end); } catch (_) { /* not a text input */ }
        }
      }
    }

    /** What the customer's next message said about a reply (implicit feedback): a weak label, not a thumb. */
    function reactionBadge(r) {
      const label = r.value > 0 ? 'up' : r.value < 0 ? 'down' : 'none';
      const arrow = r.value > 0 ? ' ▲' : r.value < 0 ? ' ▼' : '';
      const weight = r.value ? ` · weak label ${r.value > 0 ? '+1' : '−1'}, weight ${fmtNum(r.weight, 2)}` : ' · no label';
      return el('span', {
        class: `badge reaction reaction-${label}`,
        dataset: { signal: r.signal || '', value: r.value ?? '' },
        title: `implicit feedback: ${r.signal} (confidence ${fmtNum(r.confidence, 2)}; ${r.cue || ''})${weight}`,
      }, `customer: ${r.signal}${arrow}`);
    }

    function messageNode(m, byId) {
      const isAssistant = m.role === 'assistant';
      const siblings = Array.isArray(m.siblings) ? m.siblings.filter((s) => s !== m.id) : [];
      const classes = ['msg', `msg-${m.role}`];
      if (m.author) classes.push('by-operator');
      if (m.excluded) classes.push('is-excluded');
      if (siblings.length || m.regenerated_from) classes.push('has-siblings');
      const node = el('div', {
        class: classes.join(' '),
        id: `msg-${m.id}`,
        dataset: { id: m.id, role: m.role, ...(m.regenerated_from ? { regeneratedFrom: m.regenerated_from } : {}) },
      });

      const head = el(
        'div',
        { class: 'msg-head' },
        el('span', { class: 'msg-role' }, m.role),
        m.author ? el('span', { class: 'msg-author' }, m.author) : null,
        el('span', { class: 'msg-time muted' }, fmtTime(m.created_at)),
        isAssistant && m.model_version ? el('span', { class: 'msg-version badge' }, m.model_version) : null,
        isAssistant && m.finish_reason ? el('span', { class: 'msg-finish muted', title: 'finish reason' }, m.finish_reason) : null,
        isAssistant && m.latency_ms !== null && m.latency_ms !== undefined
          ? el('span', { class: 'msg-latency muted' }, `${fmtNum(m.latency_ms, 0)} ms`) : null,
        isAssistant && m.n_tokens ? el('span', { class: 'msg-tokens muted' }, `${m.n_tokens} tokens`) : null,
        m.excluded ? el('span', {
          class: 'badge excluded',
          title: `excluded by ${nameOf(m.excluded.operator)}${m.excluded.reason ? `: ${m.excluded.reason}` : ''}`,
        }, 'excluded') : null,
        isAssistant && m.reaction ? reactionBadge(m.reaction) : null,
      );
      node.append(head);
      node.append(el('div', { class: 'msg-text' }, m.text || ''));

      if (m.excluded) {
        node.append(el('div', { class: 'msg-excluded muted' },
          `excluded from training by ${nameOf(m.excluded.operator) || '?'}${m.excluded.reason ? `: ${m.excluded.reason}` : ''}`));
      }

      if (siblings.length || m.regenerated_from) {
        const jump = (sid) => el('button', {
          type: 'button', class: 'link sibling-link', dataset: { id: sid },
          onclick: () => { const t = document.getElementById(`msg-${sid}`); if (t) t.scrollIntoView({ block: 'center' }); },
        }, shortId(sid));
        node.append(el(
          'div',
          { class: 'msg-siblings' },
          m.regenerated_from ? ['regeneration of ', byId.has(m.regenerated_from) ? jump(m.regenerated_from) : shortId(m.regenerated_from), '. '] : null,
          siblings.length ? [`${siblings.length} other version${siblings.length > 1 ? 's' : ''} of this turn: `, siblings.map((s, i) => [i ? ', ' : '', jump(s)])] : null,
        ));
      }

      const ratings = Array.isArray(m.ratings) ? m.ratings : [];
      if (ratings.length) {
        node.append(el('ul', { class: 'msg-ratings' }, ratings.map((r) => el(
          'li',
          { class: `rating ${r.value > 0 ? 'up' : 'down'}`, dataset: { value: r.value, rater: r.rater || '' } },
          el('span', { class: 'rating-value' }, r.value > 0 ? '▲ up' : '▼ down'),
          r.reason ? el('span', { class: 'rating-reason' }, r.reason) : null,
          r.comment ? el('span', { class: 'rating-comment' }, `“${r.comment}”`) : null,
          el('span', { class: 'rating-rater muted' }, `by ${r.rater || '?'}`),
          r.rater_state ? el('span', { class: `badge rater-state state-${r.rater_state}` }, r.rater_state) : null,
          r.created_at ? el('span', { class: 'muted' }, fmtTime(r.created_at)) : null,
        ))));
      }

      const corrections = Array.isArray(m.corrections) ? m.corrections : [];
      if (corrections.length) {
        node.append(el('div', { class: 'msg-corrections' }, corrections.map((c) => el(
          'div',
          { class: 'correction', dataset: { id: c.id } },
          el('div', { class: 'correction-head muted' }, `correction by ${nameOf(c.operator)} · ${fmtTime(c.created_at)}${c.reason ? ` · reason: ${c.reason}` : ''}`),
          el('div', { class: 'correction-body' }, c.text || ''),
        ))));
      }

      if (reviewer && isAssistant) node.append(actionsFor(m));
      return node;
    }

    function draftOf(mid) {
      if (!page.drafts[mid]) page.drafts[mid] = { text: null, reason: '', exclude: '' };
      return page.drafts[mid];
    }

    function closeForm(mid) {
      delete page.open[mid];
      delete page.drafts[mid];
    }

    function actionsFor(m) {
      const mid = m.id;
      const box = el('div', { class: 'msg-actions' });
      const correctBtn = el('button', { type: 'button', class: 'correct-btn' }, 'Correct');
      correctBtn.addEventListener('click', () => {
        page.open[mid] = page.open[mid] === 'correct' ? undefined : 'correct';
        if (!page.open[mid]) closeForm(mid);
        renderMessages(JSON.parse(page.sig || '[]'));
        const t = $$('.msg', list).find((n) => n.dataset.id === mid);
        const area = t && $('.correction-text', t);
        if (area) area.focus();
      });
      box.append(correctBtn);

      let excludeInput = null;
      const excludeNow = async (button) => {
        const reason = excludeInput ? excludeInput.value.trim() : '';
        const ok = await act(button, () => api('POST', `/messages/${enc(mid)}/exclusion`, { reason }), 'excluded from training');
        if (ok) {
          closeForm(mid);
          await reload();
        }
      };

      if (m.excluded) {
        const includeBtn = el('button', { type: 'button', class: 'include-btn' }, 'Include again');
        includeBtn.addEventListener('click', async () => {
          const ok = await act(includeBtn, () => api('DELETE', `/messages/${enc(mid)}/exclusion`), 'included in training again');
          if (ok) await reload();
        });
        box.append(includeBtn);
      } else {
        const excludeBtn = el('button', { type: 'button', class: 'exclude-btn' }, 'Exclude');
        excludeBtn.addEventListener('click', async () => {
          if (page.open[mid] === 'exclude') {
            await excludeNow(excludeBtn);
            return;
          }
          page.open[mid] = 'exclude';
          renderMessages(JSON.parse(page.sig || '[]'));
          const t = $$('.msg', list).find((n) => n.dataset.id === mid);
          const input = t && $('.exclude-reason', t);
          if (input) input.focus();
        });
        box.append(excludeBtn);
      }

      const wrap = el('div', { class: 'msg-tools' }, box);
      const draft = draftOf(mid);
      if (page.open[mid] === 'correct') {
        const area = el('textarea', { class: 'correction-text', rows: 4, placeholder: 'The better answer' });
        area.value = draft.text === null ? m.text || '' : draft.text;
        area.addEventListener('input', () => { draft.text = area.value; });
        const reason = el('input', { class: 'correction-reason', placeholder: 'reason (optional)', value: draft.reason });
        reason.addEventListener('input', () => { draft.reason = reason.value; });
        const save = el('button', { type: 'button', class: 'correction-save primary' }, 'Save correction');
        const cancel = el('button', { type: 'button', class: 'correction-cancel' }, 'Cancel');
        save.addEventListener('click', async () => {
          const body = { text: area.value };
          if (reason.value.trim()) body.reason = reason.value.trim();
          const ok = await act(save, () => api('POST', `/messages/${enc(mid)}/correction`, body), 'correction saved');
          if (ok) {
            closeForm(mid);
            await reload();
          }
        });
        cancel.addEventListener('click', () => { closeForm(mid); renderMessages(JSON.parse(page.sig || '[]')); });
        wrap.append(el('div', { class: 'inline-form correction-form' }, area, el('div', { class: 'row' }, reason, save, cancel)));
      } else if (page.open[mid] === 'exclude' && !m.excluded) {
        excludeInput = el('input', { class: 'exclude-reason', placeholder: 'why keep it out of training?', value: draft.exclude, size: 40 });
        excludeInput.addEventListener('input', () => { draft.exclude = excludeInput.value; });
        const save = el('button', { type: 'button', class: 'exclude-save primary' }, 'Exclude from training');
        const cancel = el('button', { type: 'button', class: 'exclude-cancel' }, 'Cancel');
        excludeInput.addEventListener('keydown', (ev) => {
          if (ev.key === 'Enter') { ev.preventDefault(); excludeNow(save); }
          if (ev.key === 'Escape') { closeForm(mid); renderMessages(JSON.parse(page.sig || '[]')); }
        });
        save.addEventListener('click', () => excludeNow(save));
        cancel.addEventListener('click', () => { closeForm(mid); renderMessages(JSON.parse(page.sig || '[]')); });
        wrap.append(el('div', { class: 'inline-form exclude-form row' }, excludeInput, save, cancel));
      }
      return wrap;
    }

    async function reload() {
      try {
        await load(true);
      } catch (err) {
        showError(err);
      }
    }

    if (reviewer) {
      startBtn.addEventListener('click', async () => {
        if (await act(startBtn, () => api('POST', `${convPath}/takeover`), 'you took over this conversation')) await reload();
      });
      stopBtn.addEventListener('click', async () => {
        if (await act(stopBtn, () => api('DELETE', `${convPath}/takeover`), 'handed back to the bot')) await reload();
      });
      const send = async () => {
        const body = text.value.trim();
        if (!body) {
          flash('Type a reply first.', 'error');
          return;
        }
        if (await act(sendBtn, () => api('POST', `${convPath}/replies`, { text: body }))) {
          text.value = '';
          await reload();
        }
      };
      sendBtn.addEventListener('click', send);
      text.addEventListener('keydown', (ev) => {
        if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); send(); }
      });
    }

    try {
      await load(true);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        list.replaceChildren(emptyNote('no such conversation', 'not-found'));
        panel.hidden = true;
      }
      throw err;
    }
    ctx.poll(() => load(false), 2000);
  }

  // ---------------------------------------------------------------- page: review (raters)

  async function renderReview(main, ctx) {
    const holder = el('div', { id: 'raters' });
    main.replaceChildren(el('h1', {}, 'Rater review'),
      el('p', { class: 'muted' }, 'Raters flagged as anomalous: while pending, their ratings do not train.'), holder);

    async function load() {
      const data = await api('GET', '/raters');
      if (!ctx.alive()) return;
      const raters = listOf(data, 'raters');
      if (!raters.length) {
        holder.replaceChildren(emptyNote('no raters held for review'));
        return;
      }
      const withCount = raters.some((r) => r.n_ratings !== undefined);
      const headers = ['Rater', 'State', 'Reasons', ...(withCount ? ['Ratings'] : []), 'Reviewer', 'Updated'];
      if (can('reviewer')) headers.push('');
      holder.replaceChildren(table(headers, raters.map((r) => raterRow(r, withCount)), { class: 'data', id: 'raters-table' }));
    }

    function raterRow(r, withCount) {
      const reasons = Array.isArray(r.reasons) ? r.reasons : r.reasons ? [r.reasons] : [];
      const row = el(
        'tr',
        { class: 'rater-row', dataset: { rater: r.rater } },
        el('td', { class: 'rater-name' }, r.rater),
        el('td', { class: 'rater-state' }, el('span', { class: `badge state-${r.state}` }, r.state || '')),
        el('td', { class: 'rater-reasons' }, reasons.length ? el('ul', { class: 'plain' }, reasons.map((x) => el('li', {}, fmtValue(x)))) : '—'),
        withCount ? el('td', { class: 'num' }, fmtValue(r.n_ratings ?? null)) : null,
        el('td', {}, nameOf(r.reviewer) || '—'),
        el('td', { class: 'nowrap' }, fmtTime(r.updated_at)),
      );
      if (can('reviewer')) {
        const decide = (value, label) => {
          const b = el('button', { type: 'button', class: `${value === 'approved' ? 'approve' : 'reject'}-btn` }, label);
          b.addEventListener('click', async () => {
            const ok = await act(b, () => api('POST', `/raters/${enc(r.rater)}/review`, { state: value }), `${r.rater}: ${value}`);
            if (ok) await load().catch(showError);
          });
          return b;
        };
        row.append(el('td', { class: 'actions' }, decide('approved', 'Approve'), decide('rejected', 'Reject')));
      }
      return row;
    }

    await load();
  }

  // ---------------------------------------------------------------- page: dataset preview

  async function renderDataset(main, ctx) {
    const counts = el('section', { id: 'dataset-counts', class: 'cards' });
    const summary = el('section', { id: 'dataset-summary' });
    const dropped = el('section', { id: 'dataset-dropped' });
    const rows = el('section', { id: 'dataset-rows' });
    const exports = can('admin')
      ? el('p', { id: 'exports', class: 'exports' }, 'Export: ',
        ['dpo', 'kto', 'sft'].map((k) => [el('a', { class: 'export-link', href: `${API}/export/training.jsonl?kind=${k}`, download: `training-${k}.jsonl`, dataset: { kind: k } }, `${k}.jsonl`), ' · ']),
        el('a', { class: 'export-link', href: `${API}/export/conversations.jsonl`, download: 'conversations.jsonl', dataset: { kind: 'conversations' } }, 'conversations.jsonl'))
      : null;
    main.replaceChildren(
      el('h1', {}, 'Dataset preview'),
      el('p', { class: 'muted' }, 'What the next training run would use.'),
      exports, counts, summary, dropped, rows,
    );

    const data = (await api('GET', '/dataset/preview?rows=true')) || {};
    if (!ctx.alive()) return;

    // counts: rows per kind, by signal, split
    const c = isPlainObject(data.counts) ? { ...data.counts } : {};
    const bySignal = data.by_signal ?? c.by_signal;
    const split = data.split ?? c.split;
    delete c.by_signal;
    delete c.split;
    // "rows" is either the counts per kind ({dpo: n, ...}) or the rows themselves
    const rowsAreCounts = isPlainObject(data.rows) && Object.values(data.rows).every((v) => typeof v === 'number');
    let perKind = data.per_kind ?? data.kinds ?? c.per_kind ?? c.kinds ?? c.rows ?? (rowsAreCounts ? data.rows : undefined);
    if (!perKind) {
      perKind = Object.fromEntries(Object.entries(c).filter(([, v]) => !isPlainObject(v) && !Array.isArray(v)));
    }
    const card = (title, body, key) => el('div', { class: 'card', dataset: { section: key } }, el('h3', {}, title), body);
    counts.replaceChildren(
      card('Rows per kind', countTable(perKind, { class: 'counts-kind' }), 'kind'),
      bySignal !== undefined ? card('By signal', countTable(bySignal, { class: 'counts-signal' }), 'by_signal') : null,
      split !== undefined ? card('Split', countTable(split, { class: 'counts-split' }), 'split') : null,
    );

    // trust and cleaning summaries, and anything else the answer holds
    const trust = data.trust ?? data.trust_summary;
    const cleaning = data.cleaning ?? data.clean ?? data.cleaning_summary;
    const known = new Set(['counts', 'by_signal', 'split', 'per_kind', 'kinds', 'trust', 'trust_summary', 'cleaning', 'clean', 'cleaning_summary', 'dropped', 'rows', 'train_rows']);
    const other = Object.fromEntries(Object.entries(data).filter(([k]) => !known.has(k)));
    summary.replaceChildren(
      el('div', { class: 'cards' },
        trust !== undefined ? el('div', { class: 'card', id: 'dataset-trust' }, el('h3', {}, 'Trust'), kvTable(trust)) : null,
        cleaning !== undefined ? el('div', { class: 'card', id: 'dataset-cleaning' }, el('h3', {}, 'Cleaning'), kvTable(cleaning)) : null,
        Object.keys(other).length ? el('div', { class: 'card', id: 'dataset-other' }, el('h3', {}, 'Other'), kvTable(other)) : null),
    );

    // dropped rows with their reasons
    const drop = data.dropped;
    const dropList = Array.isArray(drop) ? drop : [];
    dropped.replaceChildren(el('h2', {}, `Dropped rows (${Array.isArray(drop) ? drop.length : isPlainObject(drop) ? Object.values(drop).reduce((a, b) => a + (Number(b) || 0), 0) : 0})`));
    if (isPlainObject(drop)) {
      dropped.append(countTable(drop, { class: 'dropped-reasons' }));
    } else if (dropList.length) {
      dropped.append(table(['Row', 'Reason'], dropList.map((d) => {
        const [what, why] = Array.isArray(d)
          ? [d[0], d[1]]
          : [d.row ?? d.item ?? d.description ?? d.what ?? d.id ?? Object.fromEntries(Object.entries(d).filter(([k]) => k !== 'reason')), d.reason];
        return el('tr', { class: 'dropped-row' }, el('td', { class: 'dropped-what' }, chatText(what)), el('td', { class: 'dropped-reason' }, fmtValue(why)));
      }), { class: 'data' }));
    } else {
      dropped.append(el('p', { class: 'muted' }, 'nothing dropped'));
    }

    // the training rows
    const all = [];
    const source = data.train_rows ?? (rowsAreCounts ? undefined : data.rows);
    if (Array.isArray(source)) for (const r of source) all.push([rowKind(r), r]);
    else if (isPlainObject(source)) for (const [kind, list] of Object.entries(source)) for (const r of listOf(list)) all.push([kind, r]);
    const LIMIT = 1000;
    rows.replaceChildren(el('h2', {}, `Training rows (${all.length})`));
    if (!all.length) rows.append(emptyNote(source === undefined ? 'the answer holds no rows' : 'no training rows', 'rows-empty'));
    rows.append(...all.slice(0, LIMIT).map(([kind, r]) => datasetRow(kind, r)));
    if (all.length > LIMIT) rows.append(el('p', { class: 'muted' }, `showing the first ${LIMIT}; export the full set as JSONL`));
  }

  /** The TRL format of a row: dpo (prompt/chosen/rejected), kto (prompt/completion/label), sft (messages). */
  function rowKind(r) {
    if (!isPlainObject(r)) return '';
    if (r.kind || r.type) return String(r.kind || r.type);
    if ('chosen' in r || 'rejected' in r) return 'dpo';
    if ('label' in r) return 'kto';
    if ('messages' in r || 'completion' in r) return 'sft';
    return '';
  }

  function datasetRow(kind, r) {
    const row = isPlainObject(r.row) ? { ...r.row, ...r } : r;
    const field = (name, value) => el('div', { class: `row-field row-${name}` }, el('div', { class: 'row-caption muted' }, name), el('div', { class: 'row-text' }, value));
    const parts = [];
    let prompt = row.prompt;
    let completion = row.completion;
    if (prompt === undefined && Array.isArray(row.messages)) {
      // SFT: the conversation, of which the last assistant turn is the completion
      const msgs = row.messages;
      const last = msgs.length && msgs[msgs.length - 1] && msgs[msgs.length - 1].role === 'assistant' ? msgs.length - 1 : msgs.length;
      prompt = msgs.slice(0, last);
      if (last < msgs.length) completion = msgs[last];
    }
    if (prompt !== undefined) parts.push(field('prompt', chatText(prompt)));
    if (row.chosen !== undefined) parts.push(field('chosen', answerText(row.chosen)));
    if (row.rejected !== undefined) parts.push(field('rejected', answerText(row.rejected)));
    if (completion !== undefined) parts.push(field('completion', answerText(completion)));
    if (row.label !== undefined) parts.push(field('label', row.label === true ? 'true (desirable)' : row.label === false ? 'false (undesirable)' : fmtValue(row.label)));
    const extra = ['source', 'signal', 'group', 'split', 'weight'].filter((k) => row[k] !== undefined && row[k] !== null);
    return el(
      'div',
      { class: 'dataset-row', dataset: { kind } },
      el('div', { class: 'row-head' }, el('span', { class: `badge kind-${kind}` }, kind || 'row'),
        extra.map((k) => el('span', { class: 'muted' }, `${k}: ${fmtValue(row[k])}`))),
      parts,
    );
  }

  // ---------------------------------------------------------------- page: runs

  function runProgress(run) {
    const p = run.progress || {};
    const hist = Array.isArray(p.history) ? p.history : [];
    const last = hist.length ? hist[hist.length - 1] : null;
    const step = p.step ?? (last && last.step);
    const loss = p.loss ?? (last && last.loss);
    const parts = [];
    if (step !== undefined && step !== null) parts.push(`step ${step}${p.max_steps ? `/${p.max_steps}` : ''}`);
    if (loss !== undefined && loss !== null) parts.push(`loss ${fmtNum(loss, 4)}`);
    return parts.join(' · ');
  }

  async function renderRuns(main, ctx) {
    const head = el('div', { class: 'title-row' }, el('h1', {}, 'Training runs'));
    if (can('admin')) {
      const train = el('button', { id: 'train-now', type: 'button', class: 'primary' }, 'Train now');
      train.addEventListener('click', async () => {
        const ok = await act(train, () => api('POST', '/runs', { force: true }), 'training run started');
        if (ok) await load().catch(showError);
      });
      head.append(train);
    }
    const holder = el('div', { id: 'runs' });
    main.replaceChildren(head, holder);

    async function load() {
      const data = await api('GET', '/runs');
      if (!ctx.alive()) return;
      const runs = listOf(data, 'runs');
      if (!runs.length) {
        holder.replaceChildren(emptyNote('no training runs yet'));
        return;
      }
      holder.replaceChildren(table(
        ['Run', 'State', 'Version', 'Started', 'Finished', 'Progress', 'Detail'],
        runs.map((r) => el(
          'tr',
          { class: `run-row state-${r.state}`, dataset: { id: r.id, state: r.state } },
          el('td', {}, el('a', { href: `/runs/${enc(r.id)}` }, `#${r.id}`)),
          el('td', { class: 'run-state' }, el('span', { class: `badge state-${r.state}` }, r.state)),
          el('td', { class: 'run-version' }, r.version || '—'),
          el('td', { class: 'nowrap' }, fmtTime(r.started_at)),
          el('td', { class: 'nowrap' }, fmtTime(r.finished_at)),
          el('td', { class: 'run-progress' }, runProgress(r)),
          el('td', { class: 'run-detail' }, r.detail || ''),
        )),
        { class: 'data', id: 'runs-table' },
      ));
    }

    await load();
    ctx.poll(load, 3000);
  }

  // what a finished run did with its time budget: the version's eval_report.budget (training/steps.py)
  function budgetText(b) {
    if (!b || !Array.isArray(b.stages)) return null;
    const stages = b.stages.map((s) => `${s.trainer} ${s.steps}/${s.planned_steps} steps, ${fmtNum(s.epochs, 2)} epochs`);
    const pct = Math.round(Number(b.share_seen) * 100);
    const limit = `budget ${fmtNum(b.max_minutes, 1)} min${b.stopped_by_budget ? ' (reached)' : ''}`;
    return [stages.join('; '), `${pct}% of rows seen`, limit].join(' · ');
  }

  // how the candidate's replies read against live's on the held-out corrected questions, and its
  // generic replies' leaks: the version's eval_report.replies (training/reading.py, the gate's judge)
  function repliesText(r) {
    if (!r || typeof r !== 'object' || !Number.isFinite(Number(r.n))) return null;
    const score = `replies ${fmtNum(r.candidate, 2)} vs live ${fmtNum(r.live, 2)}`;
    const counts = `${r.wins} better, ${r.losses} worse of ${r.n}`;
    return `${score} (${counts}) · leaks ${r.candidate_leaks ?? 0} vs ${r.live_leaks ?? 0}`;
  }

  async function renderRun(main, ctx, id) {
    const head = el('div', { class: 'title-row' }, el('h1', {}, `Run #${id}`));
    const cancel = el('button', { id: 'cancel-run', type: 'button', class: 'danger', hidden: true }, 'Cancel run');
    if (can('admin')) head.append(cancel);
    const details = el('div', { id: 'run-detail' });
    const chartBox = el('section', { id: 'loss-box', class: 'chart-box' }, el('h2', {}, 'Loss'));
    main.replaceChildren(el('p', {}, el('a', { href: '/runs', class: 'back' }, '← Runs')), head, details, chartBox);

    cancel.addEventListener('click', async () => {
      const ok = await act(cancel, () => api('POST', `/runs/${enc(id)}/cancel`), 'asked the run to stop');
      if (ok) await load().catch(showError);
    });

    let lastSig = null;
    let trained = null; // the budget line of the version the run made, fetched once
    async function load() {
      const run = await api('GET', `/runs/${enc(id)}`);
      if (!ctx.alive()) return false;
      const running = run.state === 'running' || run.state === 'cancelling';
      if (!running && run.version && trained === null) {
        try {
          const v = await api('GET', `/versions/${enc(run.version)}`);
          trained = budgetText(v.eval_report && v.eval_report.budget) || '';
        } catch (err) {
          trained = '';
        }
        if (!ctx.alive()) return false;
      }
      const sig = JSON.stringify(run) + (trained || '');
      cancel.hidden = run.state !== 'running';
      if (sig !== lastSig) {
        lastSig = sig;
        const p = run.progress || {};
        details.replaceChildren(kvTable({
          state: run.state,
          version: run.version ?? null,
          started: fmtTime(run.started_at),
          finished: fmtTime(run.finished_at) || null,
          progress: runProgress(run) || null,
          ...(p.eta_s !== undefined && p.eta_s !== null ? { 'eta (s)': Math.round(p.eta_s) } : {}),
          detail: run.detail ?? null,
          ...(trained ? { training: trained } : {}),
          ...(run.max_rating_id !== undefined ? { 'ratings up to id': run.max_rating_id } : {}),
          ...(run.max_correction_id !== undefined ? { 'corrections up to id': run.max_correction_id } : {}),
        }, { id: 'run-info' }));
        const hist = Array.isArray(p.history) ? p.history : [];
        const points = hist.map((h) => ({ x: Number(h.step), y: Number(h.loss) }));
        chartBox.replaceChildren(
          el('h2', {}, 'Loss'),
          lineChart({
            id: 'loss-chart', cls: 'loss-chart', metric: 'loss', title: 'training loss by step',
            series: [{ name: 'loss', color: COLORS[0], points }],
            xFmt: (x) => `step ${fmtNum(x, 0)}`, yFmt: (y) => fmtNum(y, 4), width: 720, height: 260,
          }),
        );
      }
      return running;
    }

    const running = await load();
    if (running) ctx.poll(load, 2000);
  }

  // ---------------------------------------------------------------- page: versions

  async function renderVersions(main, ctx) {
    const canary = el('section', { id: 'canary', class: 'panel' });
    const holder = el('div', { id: 'versions' });
    main.replaceChildren(el('h1', {}, 'Model versions'), canary, holder);

    async function loadCanary() {
      let data;
      try {
        data = await api('GET', '/canary');
      } catch (err) {
        if (ctx.alive()) canary.replaceChildren(el('strong', {}, 'Canary'), ' ', el('span', { class: 'muted' }, 'unavailable'));
        throw err;
      }
      if (!ctx.alive()) return;
      renderCanary(canary, data);
    }

    async function load() {
      const data = await api('GET', '/versions');
      if (!ctx.alive()) return;
      const versions = listOf(data, 'versions');
      if (!versions.length) {
        holder.replaceChildren(emptyNote('no model versions'));
        return;
      }
      const headers = ['Name', 'State', 'Parent', 'Created', 'Gate reasons', 'Stats', 'Eval report'];
      if (can('admin')) headers.push('');
      holder.replaceChildren(table(headers, versions.map(versionRow), { class: 'data', id: 'versions-table' }));
    }

    function versionRow(v) {
      const reasons = Array.isArray(v.gate_reasons) ? v.gate_reasons : v.gate_reasons ? [v.gate_reasons] : [];
      const row = el(
        'tr',
        { class: `version-row state-${v.state}`, dataset: { name: v.name, state: v.state } },
        el('td', { class: 'version-name' }, el('strong', {}, v.name)),
        el('td', { class: 'version-state' }, v.state || ''),
        el('td', { class: 'version-parent' }, v.parent || '—'),
        el('td', { class: 'nowrap' }, fmtTime(v.created_at)),
        el('td', { class: 'version-gate' }, reasons.length ? el('ul', { class: 'plain' }, reasons.map((r) => el('li', {}, fmtValue(r)))) : '—'),
        el('td', { class: 'version-stats' }, statsList(v.stats)),
        el('td', { class: 'version-eval' }, v.eval_report
          ? [
            ...(repliesText(v.eval_report.replies) ? [el('div', { class: 'eval-replies' }, repliesText(v.eval_report.replies))] : []),
            el('details', { class: 'eval-report' }, el('summary', {}, 'eval report'), el('pre', {}, JSON.stringify(v.eval_report, null, 2))),
          ]
          : '—'),
      );
      if (can('admin')) {
        const cell = el('td', { class: 'actions' });
        const button = (cls, label, verb, done) => {
          const b = el('button', { type: 'button', class: cls }, label);
          b.addEventListener('click', async () => {
            const ok = await act(b, () => api('POST', `/versions/${enc(v.name)}/${verb}`), `${v.name}: ${done}`);
            if (ok) await Promise.all([load(), loadCanary()]).catch(showError);
          });
          return b;
        };
        if (v.state !== 'live') cell.append(button('promote-btn', 'Promote', 'promote', 'promoted to live'));
        if (v.rollback_to) { // only where server/release.py's rollback_target says it leads somewhere
          const back = button('rollback-btn danger', 'Roll back', 'rollback', `rolled back to ${v.rollback_to}`);
          back.title = v.state === 'canary' ? `end the canary: everyone on ${v.rollback_to}` : `back to ${v.rollback_to}`;
          cell.append(back);
        }
        row.append(cell);
      }
      return row;
    }

    await Promise.all([load(), loadCanary()]);
  }

  function statsList(stats) {
    if (!isPlainObject(stats)) return stats === undefined || stats === null ? '—' : fmtValue(stats);
    const entries = Object.entries(stats).filter(([k, v]) => k !== 'name' && (v === null || typeof v !== 'object'));
    if (!entries.length) return '—';
    return el('dl', { class: 'stats' }, entries.map(([k, v]) => [el('dt', {}, k.replace(/_/g, ' ')), el('dd', {}, fmtValue(v))]));
  }

  function renderCanary(box, data) {
    const head = el('h2', {}, 'Canary');
    let c = isPlainObject(data) && 'canary' in data ? data.canary : data;
    if (isPlainObject(data) && isPlainObject(data.canary) && ('version' in data.canary || 'canary_stats' in data.canary)) {
      // {"canary": {version, live, share, since, live_stats, canary_stats, decision}}
      data = { ...data, ...data.canary };
      c = data.version;
    }
    if (!data || c === null || c === undefined || c === false) {
      box.replaceChildren(head, el('p', { class: 'muted', id: 'no-canary' }, 'no canary'));
      return;
    }
    const name = typeof c === 'string' ? c : isPlainObject(c) ? c.name || c.version : null;
    const version = data.version || name || '?';
    const share = data.share ?? (isPlainObject(c) ? c.share : undefined);
    const stats = isPlainObject(data.stats) ? data.stats : {};
    const live = data.live_stats ?? (isPlainObject(data.live) ? data.live : undefined) ?? stats.live;
    const can_ = data.canary_stats ?? stats.canary ?? (isPlainObject(c) ? c.stats : undefined);
    const since = data.since ?? data.started_at ?? (isPlainObject(c) ? c.since || c.started_at || c.updated_at : undefined);
    const parts = [
      head,
      el('p', {},
        'Version ', el('strong', { class: 'canary-version' }, typeof version === 'string' ? version : fmtValue(version)),
        share !== undefined && share !== null ? [' serves ', el('strong', { class: 'canary-share' }, fmtPct(Number(share))), ' of new conversations'] : '',
        since ? ` since ${fmtTime(since)}` : '',
        typeof data.live === 'string' ? ` (live: ${data.live})` : isPlainObject(live) && live.name ? ` (live: ${live.name})` : data.live_version ? ` (live: ${data.live_version})` : ''),
    ];
    if (isPlainObject(live) || isPlainObject(can_)) {
      const l = isPlainObject(live) ? live : {};
      const k = isPlainObject(can_) ? can_ : {};
      const keys = [...new Set([...Object.keys(l), ...Object.keys(k)])].filter((x) => x !== 'name' && typeof (l[x] ?? k[x]) !== 'object');
      parts.push(table(['', 'live', 'canary'],
        keys.map((key) => el('tr', { dataset: { key } }, el('th', {}, key.replace(/_/g, ' ')), el('td', { class: 'num' }, fmtValue(l[key])), el('td', { class: 'num' }, fmtValue(k[key])))),
        { class: 'data canary-stats' }));
    }
    const decision = data.decision ?? data.verdict;
    if (decision !== undefined && decision !== null) parts.push(el('div', { class: 'canary-decision' }, el('strong', {}, 'Decision: '), valueCell(decision)));
    parts.push(el('details', {}, el('summary', {}, 'raw'), el('pre', {}, JSON.stringify(data, null, 2))));
    box.replaceChildren(...parts);
  }

  // ---------------------------------------------------------------- page: charts

  const METRICS = [
    ['up_rate', 'Thumbs-up rate', fmtPct],
    ['regen_rate', 'Regeneration rate', fmtPct],
    ['latency_ms', 'Mean latency (ms)', (v) => fmtNum(v, 0)],
    ['reply_chars', 'Mean reply length (chars)', (v) => fmtNum(v, 0)],
  ];

  /** Flatten the stats answer to [{version, bucket_start, ...metrics}]. */
  function statRows(data) {
    const out = [];
    const add = (version, r) => {
      if (!isPlainObject(r)) return;
      out.push({
        ...r,
        version: r.version ?? r.name ?? r.model_version ?? version ?? '?',
        bucket_start: Number(r.bucket_start ?? r.bucket ?? r.start ?? r.t ?? r.at),
      });
    };
    const walk = (value) => {
      if (Array.isArray(value)) {
        for (const v of value) {
          if (isPlainObject(v) && Array.isArray(v.buckets)) for (const b of v.buckets) add(v.version ?? v.name, b);
          else add(null, v);
        }
        return;
      }
      if (!isPlainObject(value)) return;
      for (const key of ['items', 'rows', 'buckets', 'stats', 'series', 'versions']) {
        const inner = value[key];
        if (Array.isArray(inner)) return walk(inner);
        if (isPlainObject(inner)) {
          for (const [version, list] of Object.entries(inner)) {
            if (Array.isArray(list)) for (const b of list) add(version, b);
            else if (isPlainObject(list) && Array.isArray(list.buckets)) for (const b of list.buckets) add(version, b);
          }
          return;
        }
      }
    };
    walk(data);
    return out.filter((r) => Number.isFinite(r.bucket_start));
  }

  async function renderCharts(main, ctx) {
    const params = new URLSearchParams(location.search);
    const initial = params.get('bucket') === 'day' || params.get('bucket_s') === '86400' ? '86400' : '3600';
    const bucket = select({ id: 'bucket' }, [['3600', 'hour'], ['86400', 'day']], initial);
    const holder = el('div', { id: 'charts', class: 'charts' });
    main.replaceChildren(
      el('div', { class: 'title-row' }, el('h1', {}, 'Replies by version'), el('label', { class: 'field inline' }, el('span', {}, 'Bucket '), bucket)),
      holder,
    );

    async function load() {
      const bucketS = Number(bucket.value);
      const data = await api('GET', `/stats/versions?bucket_s=${bucketS}`);
      if (!ctx.alive()) return;
      const rows = statRows(data);
      const versions = [...new Set(rows.map((r) => String(r.version)))].sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
      const color = Object.fromEntries(versions.map((v, i) => [v, COLORS[i % COLORS.length]]));
      const buckets = [...new Set(rows.map((r) => r.bucket_start))].sort((a, b) => a - b);
      const fmtX = (x) => (bucketS >= 86400 ? fmtTime(x).slice(0, 10) : fmtTime(x));
      const cell = new Map(rows.map((r) => [`${r.version}|${r.bucket_start}`, r]));

      const byChannel = await api('GET', '/stats/channels');
      if (!ctx.alive()) return;
      holder.replaceChildren(channelBox(Array.isArray(byChannel.items) ? byChannel.items : [], color), ...METRICS.map(([metric, title, fmt]) => {
        const series = versions.map((v) => ({
          name: v,
          color: color[v],
          points: rows.filter((r) => String(r.version) === v && typeof r[metric] === 'number')
            .map((r) => ({ x: r.bucket_start, y: r[metric] })),
        }));
        const tbl = table(
          ['Bucket', ...versions],
          buckets.map((b) => el('tr', {}, el('th', { class: 'nowrap' }, fmtX(b)), versions.map((v) => {
            const r = cell.get(`${v}|${b}`);
            const value = r ? r[metric] : undefined;
            const extra = r && r.replies !== undefined ? `${r.replies} replies` : null;
            return el('td', { class: 'num', title: extra }, typeof value === 'number' ? fmt(value) : '—');
          }))),
          { class: 'data chart-table', 'data-metric': metric },
        );
        return el(
          'section',
          { class: 'chart-box', dataset: { metric } },
          el('h2', {}, title),
          lineChart({ cls: 'chart', metric, series, xFmt: fmtX, yFmt: fmt, title }),
          legend(series),
          rows.length ? el('div', { class: 'table-scroll' }, tbl) : el('p', { class: 'muted' }, 'no replies in this period'),
        );
      }));
    }

    bucket.addEventListener('change', async () => {
      const qs = new URLSearchParams(location.search);
      qs.set('bucket', bucket.value === '86400' ? 'day' : 'hour');
      history.replaceState(null, '', `/charts?${qs}`);
      await load().catch(showError);
    });
    await load();
  }

  /** Thumbs-up rate per channel and version: one bar per pair (rated replies only), and the table. */
  function channelBox(items, color) {
    const rated = items.filter((r) => typeof r.up_rate === 'number');
    const width = 560, bar = 18, gap = 6, left = 150;
    const height = Math.max(40, rated.length * (bar + gap) + 24);
    const root = svg('svg', {
      id: 'channel-chart', class: 'chart', viewBox: `0 0 ${width} ${height}`, width, height, role: 'img',
      'aria-label': 'Thumbs-up rate by channel and version',
    });
    const pw = width - left - 60;
    rated.forEach((r, i) => {
      const y = 8 + i * (bar + gap);
      const label = `${r.channel} · ${r.version}`;
      root.append(
        svg('text', { class: 'axis-label', x: left - 8, y: y + bar - 5, 'text-anchor': 'end' }, label),
        svg('rect', { class: 'plot-bg', x: left, y, width: pw, height: bar }),
        svg('rect', { class: 'bar', 'data-channel': r.channel, 'data-version': r.version, x: left, y, width: Math.max(1, r.up_rate * pw), height: bar, fill: color[String(r.version)] || COLORS[0] },
          svg('title', {}, `${label}: ${fmtPct(r.up_rate)} up of ${r.ups + r.downs} rated`)),
        svg('text', { class: 'axis-label', x: left + pw + 6, y: y + bar - 5 }, fmtPct(r.up_rate)),
      );
    });
    if (!rated.length) root.append(svg('text', { class: 'chart-empty', x: width / 2, y: 24, 'text-anchor': 'middle' }, 'no rated replies yet'));
    const tbl = table(
      ['Channel', 'Version', 'Replies', 'Up', 'Down', 'Up rate'],
      items.map((r) => el('tr', { dataset: { channel: r.channel, version: r.version } },
        el('td', {}, r.channel), el('td', {}, r.version), el('td', { class: 'num' }, String(r.replies)),
        el('td', { class: 'num' }, String(r.ups)), el('td', { class: 'num' }, String(r.downs)),
        el('td', { class: 'num' }, typeof r.up_rate === 'number' ? fmtPct(r.up_rate) : '—'))),
      { id: 'channel-table', class: 'data chart-table' },
    );
    return el('section', { class: 'chart-box', id: 'by-channel' }, el('h2', {}, 'Thumbs up by channel and version'), root,
      items.length ? el('div', { class: 'table-scroll' }, tbl) : el('p', { class: 'muted' }, 'no replies yet'));
  }

  // ---------------------------------------------------------------- page: audit

  async function renderAudit(main, ctx) {
    const holder = el('div', { id: 'audit' });
    main.replaceChildren(el('h1', {}, 'Audit log'), holder);
    if (!can('admin')) holder.append(el('p', { class: 'muted' }, 'The audit log is for admins.'));
    const data = await api('GET', '/audit?limit=200');
    if (!ctx.alive()) return;
    const entries = listOf(data, 'entries', 'audit');
    if (!entries.length) {
      holder.replaceChildren(emptyNote('no audit entries'));
      return;
    }
    holder.replaceChildren(table(
      ['At', 'Actor', 'Action', 'Subject', 'Detail'],
      entries.map((e) => el(
        'tr',
        { class: 'audit-row', dataset: { id: e.id ?? '' } },
        el('td', { class: 'nowrap' }, fmtTime(e.at ?? e.created_at)),
        el('td', { class: 'audit-actor' }, nameOf(e.actor ?? e.operator)),
        el('td', { class: 'audit-action' }, e.action || ''),
        el('td', { class: 'audit-subject' }, e.subject === null || e.subject === undefined ? '' : fmtValue(e.subject)),
        el('td', { class: 'audit-detail' }, e.detail === null || e.detail === undefined ? '' : fmtValue(e.detail)),
      )),
      { class: 'data', id: 'audit-table' },
    ));
  }

  // ---------------------------------------------------------------- router

  const ROUTES = [
    [/^\/conversations\/?$/, renderConversations],
    [/^\/conversations\/([^/]+)\/?$/, renderConversation],
    [/^\/review\/?$/, renderReview],
    [/^\/dataset\/?$/, renderDataset],
    [/^\/runs\/?$/, renderRuns],
    [/^\/runs\/([^/]+)\/?$/, renderRun],
    [/^\/versions\/?$/, renderVersions],
    [/^\/charts\/?$/, renderCharts],
    [/^\/audit\/?$/, renderAudit],
  ];

  function route() {
    if (!state.me) {
      renderLogin();
      return;
    }
    let path = location.pathname;
    if (path === '/' || path === '' || path === '/login' || path === '/login/') {
      history.replaceState(null, '', '/conversations');
      path = '/conversations';
    }
    const ctx = newContext();
    updateHeader();
    const main = $('#main');
    main.replaceChildren(el('p', { class: 'muted loading' }, 'Loading…'));
    for (const [pattern, render] of ROUTES) {
      const m = pattern.exec(path);
      if (!m) continue;
      const args = m.slice(1).map((s) => {
        try { return decodeURIComponent(s); } catch (_) { return s; }
      });
      Promise.resolve()
        .then(() => render(main, ctx, ...args))
        .catch((err) => {
          if (!ctx.alive()) return;
          showError(err);
          const loading = $('.loading', main);
          if (loading) loading.replaceWith(el('p', { class: 'muted' }, `Could not load this page: ${err.message}`));
        });
      return;
    }
    main.replaceChildren(el('h1', {}, 'Not found'), el('p', {}, 'No page at ', el('code', {}, path), '. ', el('a', { href: '/conversations' }, 'Go to conversations')));
  }

  function onLinkClick(ev) {
    if (ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
    const a = ev.target.closest && ev.target.closest('a[href]');
    if (!a || a.hasAttribute('download') || (a.target && a.target !== '_self')) return;
    const url = new URL(a.href, location.href);
    if (url.origin !== location.origin) return;
    if (url.pathname.startsWith('/api/') || url.pathname.startsWith('/static/')) return;
    ev.preventDefault();
    const target = url.pathname + url.search;
    if (target !== location.pathname + location.search) history.pushState(null, '', target + url.hash);
    clearFlash();
    route();
  }

  async function start() {
    document.addEventListener('click', onLinkClick);
    window.addEventListener('popstate', () => route());
    $('#logout').addEventListener('click', logout);
    $('#flash').addEventListener('click', clearFlash);
    try {
      setSession(await api('GET', '/me'));
    } catch (err) {
      state.me = null;
      if (!(err instanceof ApiError && err.status === 401)) showError(err);
      renderLogin();
      return;
    }
    route();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
