// free-roam dashboard: a client of the public API, nothing more.
//
// Every string from the service (prompts, answers, errors, URLs) reaches the page through
// textContent or an attribute, never as markup; the page's Content-Security-Policy forbids
// inline script besides. The API key, when the service needs one, lives in sessionStorage
// only: it is gone when the browser session ends.
'use strict';

(() => {
  const KEY = 'free-roam.api-key';
  const FEED_MAX = 30; // result cards kept on a job page
  const FRAME_FETCHES = 2; // frames fetched at once (they count against the read rate limit)

  /** What the current view started: timers, streams and fetches to stop when it is left. */
  let view = newView();
  let config = { auth_required: false, default_fps: 2 };

  function newView() {
    return { timers: [], abort: new AbortController(), blobs: [] };
  }

  function leaveView() {
    view.abort.abort();
    view.timers.forEach(clearInterval);
    view.blobs.forEach(URL.revokeObjectURL);
    view = newView();
  }

  // ---------- DOM: elements from data, text only ----------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = v;
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function setText(el, text) {
    const t = text === null || text === undefined ? '' : String(text);
    if (el.textContent !== t) el.textContent = t;
  }

  function badge(value) {
    const v = value || 'unknown';
    return h('span', { class: 'badge ' + v.replace(/[^a-z_]/g, '') }, v);
  }

  function setBadge(el, value) {
    const v = value || '—';
    el.className = 'badge ' + v.replace(/[^a-z_]/g, '');
    setText(el, v);
  }

  function notify(message) {
    const box = document.getElementById('notice');
    const line = h('div', {}, message);
    box.append(line);
    while (box.children.length > 2) box.firstElementChild.remove();
    setTimeout(() => line.remove(), 5000);
  }

  function show(title, ...content) {
    const main = document.getElementById('main');
    const heading = h('h1', { tabindex: '-1' }, title);
    main.replaceChildren(heading, ...content.flat());
    document.title = title + ' · free-roam';
    return heading;
  }

  function when(epochSecs) {
    if (epochSecs === null || epochSecs === undefined) return '—';
    return new Date(epochSecs * 1000).toLocaleString();
  }

  function seconds(ms) {
    if (ms === null || ms === undefined) return '—';
    return (ms / 1000).toFixed(1) + ' s';
  }

  function isActive(job) {
    return job.status === 'pending' || job.status === 'running';
  }

  /** The kind of source, and its state while a pipeline reads it (`live`, `reconnecting`...). */
  function sourceText(job) {
    const state = job.stats && job.stats.source_state;
    return job.source_type + (state ? ' · ' + state : '');
  }

  function jobHref(id) {
    return '#/job/' + encodeURIComponent(id);
  }

  // ---------- the API ----------

  class ApiError extends Error {
    constructor(status, body) {
      const detail = body && body.error ? body.error : {};
      super(detail.message || 'HTTP ' + status);
      this.status = status;
      this.param = detail.param || null;
    }
  }

  function authHeaders() {
    const headers = new Headers();
    const key = sessionStorage.getItem(KEY);
    if (key) headers.set('Authorization', 'Bearer ' + key);
    return headers;
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      if (signal) signal.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
    });
  }

  function retryAfterMs(response) {
    const s = Number(response.headers.get('Retry-After'));
    return Number.isFinite(s) && s > 0 ? Math.min(s, 30) * 1000 : 1000;
  }

  /** Calls the API with the session's key; waits out rate limits; throws ApiError. */
  async function api(path, options = {}) {
    const headers = authHeaders();
    let body;
    if (options.json !== undefined) {
      headers.set('Content-Type', 'application/json');
      body = JSON.stringify(options.json);
    }
    const signal = options.signal || view.abort.signal;
    for (let attempt = 0; ; attempt++) {
      const response = await fetch(path, { method: options.method || 'GET', headers, body, signal });
      if (response.status === 429 && attempt < 4) {
        await sleep(retryAfterMs(response), signal);
        continue;
      }
      if (response.status === 401) {
        sessionStorage.removeItem(KEY);
        keyForm('The API key was refused. Enter a valid key.');
        throw new ApiError(401, null);
      }
      if (!response.ok) {
        let parsed = null;
        try { parsed = await response.json(); } catch (_) { /* not JSON */ }
        throw new ApiError(response.status, parsed);
      }
      return options.raw ? response : response.json();
    }
  }

  /** Runs `fn` now and every `ms` while the view lasts; errors are shown once, not thrown. */
  function every(ms, fn) {
    let failing = false;
    const run = async () => {
      try {
        await fn();
        failing = false;
      } catch (e) {
        if (view.abort.signal.aborted || e.status === 401 || e.name === 'AbortError') return;
        if (!failing) notify('Cannot refresh: ' + e.message);
        failing = true;
      }
    };
    run();
    view.timers.push(setInterval(run, ms));
  }

  /**
   * Follows a Server-Sent Events route with the API key (EventSource cannot send one):
   * resumes after the last id when the connection drops; stops at `end` or when the view ends.
   */
  async function followEvents(path, onEvent, lastId) {
    const signal = view.abort.signal;
    let last = lastId;
    while (!signal.aborted) {
      try {
        const headers = authHeaders();
        if (last !== null && last !== undefined) headers.set('Last-Event-ID', String(last));
        const response = await fetch(path, { headers, signal });
        if (response.status === 429) { await sleep(retryAfterMs(response), signal); continue; }
        if (!response.ok) {
          let parsed = null;
          try { parsed = await response.json(); } catch (_) { /* not JSON */ }
          throw new ApiError(response.status, parsed);
        }
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n?/g, '\n');
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const event = { type: 'message', data: [], id: null };
            for (const line of block.split('\n')) {
              if (line.startsWith(':')) continue;
              const colon = line.indexOf(':');
              const field = colon < 0 ? line : line.slice(0, colon);
              const val = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
              if (field === 'event') event.type = val;
              else if (field === 'data') event.data.push(val);
              else if (field === 'id') event.id = val;
            }
            if (event.id !== null) last = event.id;
            if (!event.data.length) continue;
            const data = JSON.parse(event.data.join('\n'));
            if (onEvent(event.type, data) === 'stop' || event.type === 'end') return;
          }
        }
      } catch (e) {
        if (signal.aborted || e.name === 'AbortError') return;
        if (e.status === 404 || e.status === 401) return;
        notify('The live feed was interrupted (' + e.message + '); reconnecting.');
      }
      await sleep(1000, signal);
    }
  }

  /** Fetches frames a few at a time, with the key, into blob URLs the view revokes. */
  const frames = { queue: [], active: 0 };

  function loadFrame(img, url) {
    frames.queue.push({ img, url, signal: view.abort.signal, blobs: view.blobs });
    // After the caller has put the image in the page: cards dropped meanwhile are skipped.
    queueMicrotask(pumpFrames);
  }

  async function pumpFrames() {
    while (frames.active < FRAME_FETCHES && frames.queue.length) {
      const job = frames.queue.shift();
      if (job.signal.aborted || !job.img.isConnected) continue;
      frames.active++;
      (async () => {
        try {
          const response = await api(job.url, { raw: true, signal: job.signal });
          const url = URL.createObjectURL(await response.blob());
          job.blobs.push(url);
          job.img.src = url;
        } catch (e) {
          if (!job.signal.aborted) job.img.replaceWith(h('p', { class: 'muted' }, 'Frame not available: ' + e.message));
        } finally {
          frames.active--;
          pumpFrames();
        }
      })();
    }
  }

  // ---------- session: the API key ----------

  function sessionBar() {
    const bar = document.getElementById('session');
    if (!config.auth_required) { bar.replaceChildren(); return; }
    if (sessionStorage.getItem(KEY)) {
      bar.replaceChildren(h('span', {}, 'API key set'), h('button', {
        type: 'button',
        class: 'secondary',
        onclick: () => { sessionStorage.removeItem(KEY); keyForm(); },
      }, 'Forget key'));
    } else {
      bar.replaceChildren(h('span', {}, 'No API key'));
    }
  }

  function keyForm(problem) {
    leaveView();
    sessionBar();
    const input = h('input', { id: 'api-key', type: 'password', autocomplete: 'off', required: true });
    const form = h('form', {
      class: 'panel',
      onsubmit: (ev) => {
        ev.preventDefault();
        sessionStorage.setItem(KEY, input.value.trim());
        sessionBar();
        route();
      },
    },
    h('label', { for: 'api-key' }, 'API key'),
    input,
    h('p', { class: 'hint' }, 'This service requires one of its API_KEYS. It is kept in this browser tab\'s session only.'),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Use this key')));
    show('Sign in', problem ? h('p', { class: 'error', role: 'alert' }, problem) : null, form);
    input.focus();
  }

  // ---------- jobs ----------

  const JOB_COLUMNS = [
    ['Job', null],
    ['Status', null],
    ['Source', null],
    ['Live lag', 'num'],
    ['FPS', 'num'],
    ['Results', 'num'],
    ['Errors', 'num'],
    ['Drops', 'num'],
    ['Model', null],
    ['Created', null],
  ];

  function jobsView() {
    const health = h('div', { class: 'health', 'aria-live': 'polite' }, 'Checking…');
    const filter = h('select', { id: 'status-filter' },
      ['all', 'pending', 'running', 'completed', 'failed', 'cancelled'].map((s) => h('option', { value: s }, s)));
    const tbody = h('tbody');
    const summary = h('p', { class: 'muted', 'aria-live': 'polite' });
    const rows = new Map();
    const heading = show('Jobs',
      h('section', { class: 'panel', 'aria-labelledby': 'health-h' }, h('h2', { id: 'health-h' }, 'Health'), health),
      h('div', { class: 'row' },
        h('div', {}, h('label', { for: 'status-filter' }, 'Show'), filter),
        h('a', { class: 'button', href: '#/start' }, 'Start a job')),
      summary,
      h('div', { class: 'table-wrap' },
        h('table', { id: 'jobs' },
          h('caption', { class: 'muted' }, 'Newest first; refreshed every 2 seconds.'),
          h('thead', {}, h('tr', {}, JOB_COLUMNS.map(([name, cls]) => h('th', { scope: 'col', class: cls }, name)))),
          tbody)));
    heading.focus();

    const refreshJobs = async () => {
      const status = filter.value === 'all' ? '' : '&status=' + filter.value;
      const page = await api('/api/v1/inference/jobs?limit=50' + status);
      setText(summary, page.total + (page.total === 1 ? ' job' : ' jobs') + (status ? ' ' + filter.value : ''));
      const seen = new Set();
      page.jobs.forEach((job, i) => {
        seen.add(job.job_id);
        let row = rows.get(job.job_id);
        if (!row) {
          const cells = JOB_COLUMNS.map(([, cls]) => h('td', { class: cls }));
          cells[0].append(h('a', { href: jobHref(job.job_id), class: 'mono' }, job.job_id));
          cells[1].append(h('span', { class: 'badge' }));
          row = { tr: h('tr', { 'data-job': job.job_id }, cells), cells };
          rows.set(job.job_id, row);
        }
        const s = job.stats || {};
        const c = row.cells;
        setBadge(c[1].firstChild, job.status);
        setText(c[2], sourceText(job));
        setText(c[3], isActive(job) ? seconds(s.live_lag_ms) : '—');
        setText(c[4], job.fps);
        setText(c[5], job.results_count);
        setText(c[6], s.errors || 0);
        setText(c[7], s.frames_dropped || 0);
        setText(c[8], job.model);
        setText(c[9], when(job.created_at));
        if (tbody.children[i] !== row.tr) tbody.insertBefore(row.tr, tbody.children[i] || null);
      });
      for (const [id, row] of rows) {
        if (!seen.has(id)) { row.tr.remove(); rows.delete(id); }
      }
      if (!page.jobs.length && !tbody.querySelector('.empty')) {
        tbody.append(h('tr', { class: 'empty' }, h('td', { colspan: JOB_COLUMNS.length }, 'No jobs yet. Start one.')));
      } else if (page.jobs.length) {
        tbody.querySelectorAll('.empty').forEach((e) => e.remove());
      }
    };
    filter.addEventListener('change', refreshJobs);
    every(2000, refreshJobs);
    every(5000, () => refreshHealth(health));
  }

  async function refreshHealth(box) {
    // /health answers 503 with the same body when a component is unhealthy.
    const response = await fetch('/health', { signal: view.abort.signal });
    const body = await response.json();
    const items = Object.entries(body.components || {}).map(([name, c]) =>
      h('div', { 'data-component': name }, h('strong', {}, name + ' '), badge(c.status), ' ', h('span', { class: 'muted' }, c.detail)));
    items.unshift(h('div', {}, h('strong', {}, 'service '), badge(body.status === 'healthy' ? 'ok' : 'error'),
      ' ', h('span', { class: 'muted' }, 'version ' + body.version + (body.draining ? ', draining' : ''))));
    box.replaceChildren(...items);
  }

  /** Runs a form's API call with its button disabled; the API's refusal is shown in `problem`. */
  async function submitting(button, problem, call) {
    problem.replaceChildren();
    button.disabled = true;
    try {
      await call();
    } catch (e) {
      if (e.status !== 401 && !view.abort.signal.aborted) problem.replaceChildren(h('p', { class: 'error' }, e.message));
    } finally {
      button.disabled = false;
    }
  }

  // ---------- start ----------

  function field(id, label, input, hint) {
    input.id = id;
    if (hint) input.setAttribute('aria-describedby', id + '-hint');
    return [h('label', { for: id }, label), input, hint ? h('p', { id: id + '-hint', class: 'hint' }, hint) : null];
  }

  function startView() {
    const ref = h('input', { type: 'text', name: 'stream_ref', required: true, placeholder: 'https://example.com/live/index.m3u8', autocomplete: 'off' });
    const prompt = h('textarea', { name: 'prompt' });
    const fps = h('input', { type: 'number', name: 'fps', min: '0.1', max: '60', step: '0.1', value: String(config.default_fps) });
    const model = h('input', { type: 'text', name: 'model', autocomplete: 'off' });
    const id = h('input', { type: 'text', name: 'job_id', autocomplete: 'off' });
    const problem = h('div', { role: 'alert' });
    const submit = h('button', { type: 'submit' }, 'Start');
    const form = h('form', { class: 'panel', id: 'start-form', novalidate: true },
      field('start-ref', 'Stream', ref, 'An HLS playlist URL, redis://host:port/db/key, or a Redis stream key.'),
      field('start-prompt', 'Prompt', prompt, 'Leave empty to follow the global prompt.'),
      field('start-fps', 'Frames per second', fps, '0.1 to 60, in media time.'),
      field('start-model', 'Model', model, 'Leave empty for the default model.'),
      field('start-id', 'Job id', id, 'Optional: letters, digits, ".", "_", "-"; a new id when empty.'),
      problem,
      h('div', { class: 'actions' }, submit));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const body = { stream_ref: ref.value.trim(), fps: Number(fps.value) };
      if (prompt.value.trim()) body.prompt = prompt.value;
      if (model.value.trim()) body.model = model.value.trim();
      if (id.value.trim()) body.job_id = id.value.trim();
      await submitting(submit, problem, async () => {
        const started = await api('/api/v1/inference/start', { method: 'POST', json: body });
        notify('Started job ' + started.job_id);
        location.hash = jobHref(started.job_id);
      });
    });
    show('Start a job', form).focus();
  }

  // ---------- one job ----------

  function jobView(jobId) {
    const facts = h('dl', { class: 'facts' });
    const statusBadge = h('span', { class: 'badge', id: 'job-status' });
    const problem = h('p', { class: 'error', hidden: true });
    const controls = h('div', { class: 'actions' });
    const feed = h('ol', { class: 'feed', id: 'feed', 'aria-label': 'Newest results first' });
    const feedNote = h('p', { class: 'muted', 'aria-live': 'polite' }, 'Waiting for results…');
    const alertsBox = h('section', { id: 'alerts', hidden: true, 'aria-labelledby': 'alerts-h' });
    const promptBox = h('section', { id: 'prompt-editor', 'aria-labelledby': 'prompt-h' });
    const heading = show('Job',
      h('p', { class: 'row' }, h('span', { class: 'mono' }, jobId), statusBadge),
      problem,
      h('section', { class: 'panel', 'aria-label': 'Job facts' }, facts, controls),
      h('div', { class: 'layout' },
        h('section', { 'aria-labelledby': 'feed-h' }, h('h2', { id: 'feed-h' }, 'Live results'), feedNote, feed),
        h('div', {}, alertsBox, promptBox)));
    heading.focus();

    const factCells = {};
    const fact = (name) => {
      if (!factCells[name]) {
        factCells[name] = h('dd');
        facts.append(h('div', {}, h('dt', {}, name), factCells[name]));
      }
      return factCells[name];
    };

    let active = null;
    let feedStarted = false;
    const refresh = async () => {
      let job;
      try {
        job = await api('/api/v1/inference/status/' + encodeURIComponent(jobId));
      } catch (e) {
        if (e.status === 404) {
          problem.hidden = false;
          setText(problem, 'No such job: ' + jobId);
          view.timers.forEach(clearInterval);
          return;
        }
        throw e;
      }
      const s = job.stats || {};
      setBadge(statusBadge, job.status);
      setText(fact('Stream'), job.stream_ref);
      setText(fact('Model'), job.model);
      setText(fact('FPS'), job.fps);
      setText(fact('Prompt in force'), job.prompt_version ? 'v' + job.prompt_version + ' (' + job.prompt_scope + ')' : '—');
      setText(fact('Source'), sourceText(job));
      setText(fact('Live lag'), isActive(job) ? seconds(s.live_lag_ms) : '—');
      setText(fact('Frames sampled'), s.frames_sampled || 0);
      setText(fact('Results'), job.results_count);
      setText(fact('Errors'), s.errors || 0);
      setText(fact('Drops'), s.frames_dropped || 0);
      setText(fact('Latency p50'), job.latency_ms && job.latency_ms.total ? Math.round(job.latency_ms.total.p50) + ' ms' : '—');
      setText(fact('Replica'), job.owner || '—');
      setText(fact('Created'), when(job.created_at));
      problem.hidden = !job.error;
      setText(problem, job.error || '');
      if (isActive(job) !== active) {
        active = isActive(job);
        controls.replaceChildren(active ? cancelButton(jobId, refresh) : h('span', { class: 'muted' }, 'This job has ended.'));
      }
      if (!feedStarted) {
        feedStarted = true;
        const from = job.results_count - FEED_MAX - 1;
        startFeed(jobId, feed, feedNote, from >= 0 ? from : null);
      }
    };
    every(2000, refresh);
    every(3000, alertEvents(jobId, alertsBox));
    promptEditor(promptBox, jobId);
    promptBox.after(replayForm(jobId));
  }

  /** Asks the model again about a range of this job's stored frames with another prompt. */
  function replayForm(jobId) {
    const from = h('input', { type: 'number', min: '0', step: '1', value: '0' });
    const to = h('input', { type: 'number', min: '0', step: '1', value: '9' });
    const prompt = h('textarea', {});
    const problem = h('div', { role: 'alert' });
    const submit = h('button', { type: 'submit' }, 'Replay');
    const form = h('form', { id: 'replay-form' },
      h('p', { class: 'hint' }, 'Ask about frames this job kept again, with another prompt, as a new job whose results name the originals.'),
      h('div', { class: 'row' },
        h('div', {}, field('replay-from', 'From result', from)),
        h('div', {}, field('replay-to', 'To result', to))),
      field('replay-prompt', 'Prompt', prompt),
      problem,
      h('div', { class: 'actions' }, submit));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      await submitting(submit, problem, async () => {
        const started = await api('/api/v1/inference/replay', {
          method: 'POST',
          json: { job_id: jobId, from_seq: Number(from.value), to_seq: Number(to.value), prompt: prompt.value },
        });
        notify('Replaying as job ' + started.job_id);
        location.hash = jobHref(started.job_id);
      });
    });
    return h('section', { 'aria-labelledby': 'replay-h' }, h('h2', { id: 'replay-h' }, 'Replay with another prompt'), form);
  }

  function cancelButton(jobId, refresh) {
    const box = h('div', { class: 'actions' });
    const ask = h('button', { type: 'button', class: 'danger', id: 'cancel-job' }, 'Cancel job');
    ask.addEventListener('click', () => {
      const yes = h('button', { type: 'button', class: 'danger', id: 'cancel-confirm' }, 'Yes, cancel it');
      const no = h('button', { type: 'button', class: 'secondary' }, 'Keep it running');
      no.addEventListener('click', () => { box.replaceChildren(ask); ask.focus(); });
      yes.addEventListener('click', async () => {
        yes.disabled = true;
        try {
          await api('/api/v1/inference/cancel/' + encodeURIComponent(jobId), { method: 'DELETE' });
          notify('Job ' + jobId + ' cancelled');
          await refresh();
        } catch (e) {
          if (e.status !== 401) notify('Cannot cancel: ' + e.message);
          yes.disabled = false;
        }
      });
      box.replaceChildren(h('span', {}, 'Stop this job? Results stored so far are kept. '), yes, no);
      yes.focus();
    });
    box.append(ask);
    return box;
  }

  function startFeed(jobId, feed, note, after) {
    let shown = 0;
    const path = '/api/v1/inference/results/' + encodeURIComponent(jobId) + '/stream';
    followEvents(path, (type, data) => {
      if (type === 'result') {
        feed.prepend(resultCard(data));
        shown++;
        setText(note, shown === 1 ? '1 result shown' : shown + ' results shown' + (shown > FEED_MAX ? ' (newest ' + FEED_MAX + ' kept)' : ''));
        while (feed.children.length > FEED_MAX) {
          const old = feed.lastElementChild;
          const img = old.querySelector('img');
          if (img && img.src.startsWith('blob:')) URL.revokeObjectURL(img.src);
          old.remove();
        }
      } else if (type === 'end') {
        setText(note, (shown ? shown + ' results shown. ' : '') + 'The job has ended (' + data.status + ').');
      }
      return undefined;
    }, after);
  }

  function answerText(r) {
    if (r.output === null || r.output === undefined) return '';
    return typeof r.output === 'string' ? r.output : JSON.stringify(r.output, null, 2);
  }

  function resultCard(r) {
    // A clip's result covers its first to its last frame.
    const pts = seconds(r.pts_ms) + (r.pts_end_ms !== undefined ? '–' + seconds(r.pts_end_ms) : '');
    let picture;
    if (r.frame_url) {
      const img = h('img', { alt: 'Frame at ' + pts + ' (result ' + r.seq + ')', width: '240', height: '135' });
      loadFrame(img, r.frame_url);
      picture = h('figure', {}, img, h('figcaption', {}, pts));
    } else {
      picture = h('figure', {}, h('p', { class: 'muted' }, 'No frame kept'), h('figcaption', {}, pts));
    }
    const alerts = (r.alerts || []).map((a) => h('li', {}, h('strong', {}, a.name + ': '), a.answer + (a.raw ? ' (' + a.raw + ')' : '')));
    const replay = r.replay_of ? h('p', { class: 'meta' }, 'Replay of ', h('a', { href: jobHref(r.replay_of.job_id) }, r.replay_of.job_id), ' #' + r.replay_of.seq) : null;
    const repeat = r.repeats_seq !== undefined ? h('p', { class: 'meta' }, 'Unchanged since #' + r.repeats_seq + ': the model was not asked again') : null;
    return h('li', { class: 'card', 'data-seq': r.seq, 'data-prompt-version': r.prompt_version },
      picture,
      h('div', {},
        h('p', { class: 'meta' }, '#' + r.seq + ' · prompt v' + r.prompt_version + ' (' + r.prompt_scope + ') · ' + r.model +
          (r.latency_ms && r.latency_ms.total !== undefined ? ' · ' + Math.round(r.latency_ms.total) + ' ms' : '')),
        r.error
          ? h('p', { class: 'answer failed pre' }, 'Error: ' + r.error)
          : h('p', { class: 'answer pre' }, answerText(r)),
        alerts.length ? h('ul', { class: 'meta' }, alerts) : null,
        repeat,
        replay));
  }

  function alertEvents(jobId, box) {
    let after = null;
    let list = null;
    let active = null;
    return async () => {
      const q = after === null ? '' : '?after=' + after;
      const page = await api('/api/v1/inference/alerts/' + encodeURIComponent(jobId) + q);
      if (!page.rules && !page.events.length && !list) return;
      if (!list) {
        list = h('ol', { class: 'events', reversed: true });
        active = h('p', {});
        box.hidden = false;
        box.replaceChildren(h('h2', { id: 'alerts-h' }, 'Alert events'), active, list);
      }
      const rules = page.rules ? page.rules.alerts.map((r) => r.name).join(', ') : 'none';
      setText(active, 'Rules: ' + rules + '. Active now: ' + (page.active.length ? page.active.join(', ') : 'none') + '.');
      for (const e of page.events) {
        const d = e.data || {};
        const started = e.type === 'alert.started';
        list.prepend(h('li', { class: started ? 'started' : 'ended' },
          h('strong', {}, (started ? 'Started: ' : 'Ended: ') + d.alert),
          ' ', h('span', { class: 'muted' }, seconds(d.from_pts_ms) + '–' + seconds(d.to_pts_ms) + ' · ' + when(e.created_at)),
          d.question ? h('div', { class: 'pre' }, d.question) : null));
      }
      if (page.next_after !== null && page.next_after !== undefined) after = page.next_after;
    };
  }

  // ---------- prompts: editor, history, diff ----------

  function promptView() {
    const box = h('section', { 'aria-labelledby': 'prompt-h' });
    show('Global prompt', h('p', { class: 'muted' }, 'Jobs without a prompt of their own follow this one; a new version applies from their next frame.'), box).focus();
    promptEditor(box, null);
  }

  function promptEditor(box, jobId) {
    const scope = jobId ? '?job_id=' + encodeURIComponent(jobId) : '';
    const text = h('textarea', { id: 'prompt-text', name: 'prompt' });
    const problem = h('div', { role: 'alert' });
    const save = h('button', { type: 'submit' }, 'Save as new version');
    const current = h('p', { class: 'muted', id: 'prompt-current' });
    const versions = h('tbody');
    const fromSel = h('select', { id: 'diff-from' });
    const toSel = h('select', { id: 'diff-to' });
    const diffOut = h('div', { class: 'diff pre', id: 'prompt-diff', 'aria-live': 'polite' });
    let history = [];

    const form = h('form', { id: 'prompt-form' },
      h('label', { for: 'prompt-text' }, jobId ? 'New prompt for this job' : 'New global prompt'),
      text, problem, h('div', { class: 'actions' }, save));
    box.replaceChildren(
      h('h2', { id: 'prompt-h' }, 'Prompt'),
      current, form,
      h('h3', {}, 'Versions'),
      h('div', { class: 'table-wrap' }, h('table', { class: 'versions' },
        h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Version'), h('th', { scope: 'col' }, 'Written'), h('th', { scope: 'col' }, 'Prompt'))),
        versions)),
      h('h3', {}, 'Compare versions'),
      h('div', { class: 'row' },
        h('div', {}, h('label', { for: 'diff-from' }, 'From'), fromSel),
        h('div', {}, h('label', { for: 'diff-to' }, 'To'), toSel)),
      diffOut);

    const renderDiff = () => {
      const a = history.find((v) => String(v.version) === fromSel.value);
      const b = history.find((v) => String(v.version) === toSel.value);
      if (!a || !b) { diffOut.replaceChildren(h('span', { class: 'muted' }, 'Two versions are needed to compare.')); return; }
      diffOut.replaceChildren(...wordDiff(a.prompt, b.prompt).map(([op, t]) =>
        op === '=' ? document.createTextNode(t) : h(op === '+' ? 'ins' : 'del', {}, t)));
    };
    fromSel.addEventListener('change', renderDiff);
    toSel.addEventListener('change', renderDiff);

    const load = async () => {
      const [now, past] = await Promise.all([
        api('/api/v1/prompt/current' + scope),
        api('/api/v1/prompt/history' + (scope ? scope + '&' : '?') + 'limit=50'),
      ]);
      const own = !jobId || now.scope === 'job';
      setText(current, 'In force: v' + now.version + ' (' + now.scope + ')' + (own ? '' : ' — this job follows the global prompt; saving gives it its own.'));
      if (!text.value) text.value = now.prompt;
      history = past.history;
      versions.replaceChildren(...history.map((v) => h('tr', { 'data-version': v.version },
        h('td', {}, 'v' + v.version), h('td', {}, when(v.timestamp)), h('td', { class: 'pre' }, v.prompt))));
      if (!history.length) versions.append(h('tr', {}, h('td', { colspan: 3 }, jobId ? 'This job has no prompt of its own yet.' : 'No versions yet.')));
      const options = () => history.map((v) => h('option', { value: v.version }, 'v' + v.version));
      fromSel.replaceChildren(...options());
      toSel.replaceChildren(...options());
      if (history.length) {
        toSel.value = String(history[0].version);
        fromSel.value = String(history[Math.min(1, history.length - 1)].version);
      }
      renderDiff();
    };

    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      await submitting(save, problem, async () => {
        const body = { prompt: text.value };
        if (jobId) body.job_id = jobId;
        const written = await api('/api/v1/prompt/update', { method: 'POST', json: body });
        notify('Prompt v' + written.version + ' saved');
        await load();
      });
    });
    load().catch((e) => { if (e.status !== 401 && !view.abort.signal.aborted) problem.replaceChildren(h('p', { class: 'error' }, e.message)); });
  }

  /** Word-level diff (longest common subsequence): [op, text] with op '=', '-' or '+'. */
  function wordDiff(a, b) {
    const A = a.match(/\s+|[^\s]+/g) || [];
    const B = b.match(/\s+|[^\s]+/g) || [];
    const n = A.length;
    const m = B.length;
    const w = m + 1;
    const L = new Uint32Array((n + 1) * w);
    for (let i = n - 1; i >= 0; i--) {
      for (let j = m - 1; j >= 0; j--) {
        L[i * w + j] = A[i] === B[j] ? L[(i + 1) * w + j + 1] + 1 : Math.max(L[(i + 1) * w + j], L[i * w + j + 1]);
      }
    }
    const out = [];
    const push = (op, t) => {
      const lastOp = out[out.length - 1];
      if (lastOp && lastOp[0] === op) lastOp[1] += t; else out.push([op, t]);
    };
    let i = 0;
    let j = 0;
    while (i < n && j < m) {
      if (A[i] === B[j]) { push('=', A[i]); i++; j++; } else if (L[(i + 1) * w + j] >= L[i * w + j + 1]) { push('-', A[i]); i++; } else { push('+', B[j]); j++; }
    }
    while (i < n) push('-', A[i++]);
    while (j < m) push('+', B[j++]);
    return out;
  }

  // ---------- routing ----------

  function route() {
    leaveView();
    sessionBar();
    if (config.auth_required && !sessionStorage.getItem(KEY)) { keyForm(); return; }
    const hash = location.hash || '#/';
    const job = hash.match(/^#\/job\/(.+)$/);
    if (hash === '#/' || hash === '#') jobsView();
    else if (hash === '#/start') startView();
    else if (hash === '#/prompt') promptView();
    else if (job) jobView(decodeURIComponent(job[1]));
    else show('Not found', h('p', {}, 'Nothing is here. '), h('a', { href: '#/' }, 'See the jobs.')).focus();
  }

  async function boot() {
    try {
      const response = await fetch('/ui/config.json');
      config = await response.json();
    } catch (e) {
      show('Cannot reach the service', h('p', { class: 'error' }, e.message));
      return;
    }
    window.addEventListener('hashchange', route);
    route();
  }

  boot();
})();
