'use strict';
// Ovis-Image playground: lists the served models, builds the form from the chosen model's
// input schema (both public, so the form shows before a token is entered), submits jobs,
// follows the newest one and lists this token's recent requests. A schema's image field
// (image_url) becomes an upload (file picker, drop or paste; sent as a data URI) and an
// array of objects (loras) becomes rows to add and remove: a new model needs no page change.

const DEFAULT_MODEL = 'aidc-ai/ovis-image';
// A schema's example prompt can run to a page: the form starts with a short one instead.
const SHORT_PROMPT = 'A neon sign that reads "OVIS" above a rainy street';
const LONG_DEFAULT = 200;
// Help in plain words for the fields most models share; other fields show the schema's.
const PLAIN_HELP = {
  prompt: 'What the image should show. Words in quotes are drawn as text. A very long prompt is cut to what the model reads, and the result says so.',
  negative_prompt: 'What the image should not show. Optional.',
  image_size: 'A preset shape, or "custom size" to give width and height yourself.',
  num_inference_steps: 'More steps take longer and usually add detail.',
  guidance_scale: 'How closely the image follows the prompt: higher is closer, lower is freer.',
  seed: 'Leave empty for a random one. The same seed and settings give the same image again.',
  output_format: 'The file type of the image.',
  strength: 'How much of the input image is redrawn: near 0 keeps it, 1 ignores it.',
  loras: 'LoRAs applied to the model, each with its strength. Optional.',
};
// Rows of an array field: its heading, the add button, one row's name, and plain labels
// and help for the items' fields (others show the schema's).
const ROWS_TEXT = {
  loras: { legend: 'LoRAs', add: 'Add a LoRA', row: 'LoRA' },
};
const ITEM_TEXT = {
  loras: {
    path: ['Name or path', 'A LoRA on this server by its name, or a Hugging Face repo id or an https URL of a .safetensors file where the server allows them.'],
    scale: ['Scale', 'How strongly it applies (0 not at all, 1 as trained).'],
  },
};
// Input images travel base64-encoded (a third larger) in a JSON body that the server caps at
// 16 MiB by default (--max-image-body-size): 12 MB leaves room for the rest. The server
// checks everything again, with its own limits.
const MAX_IMAGE_BYTES = 12 * 1000 * 1000;
const IMAGE_TYPES = 'PNG, JPEG or WEBP';
const TOKEN_SETTLE_MS = 250; // typing a token: act once it stops changing
const TOKEN_KEY = 'ovis-server-token';
const POLL_MS = 400;
const RETRY_MS = 2000;
const PAGE_SIZE = 12;
const FINAL = new Set(['completed', 'succeeded', 'cancelled', 'failed']);
const CREATE_HINT = 'the first `ovis-server serve` prints one, or run `ovis-server token create --name NAME`';
const OUTCOMES = {
  cancelled: 'The job was cancelled.',
  cancellation_requested: 'Cancellation requested: the job stops at its next step.',
  not_cancellable: 'The job could not be cancelled: it had already finished.',
};

const $ = (id) => document.getElementById(id);
// fields: [{name, read}] in schema order; job: {id, prompt, cancelling}. The *Gen counters
// let a late answer see that a newer load or job has replaced the one it was for.
// pending: a submit waits for the token it asked for. models: the served models' ids.
const state = {
  modelId: DEFAULT_MODEL, models: [], fields: [], ready: false, pending: false, job: null, cursor: null,
  modelGen: 0, jobGen: 0, galleryGen: 0, streamAbort: null, token: '', tokenTimer: null,
};

function apiError(status, message) {
  return Object.assign(new Error(message), { status });
}

function el(tag, className = '', text = '') {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  return node;
}

function setAttr(node, name, value) {
  if (value !== undefined && value !== null) node.setAttribute(name, String(value));
}

// Only http(s) URLs from the API become links or image sources.
function safeUrl(url) {
  const value = Array.isArray(url) ? url[0] : url;
  return typeof value === 'string' && /^https?:\/\//i.test(value) ? value : '';
}

const token = () => $('token').value.trim();

// The token lives in sessionStorage (this tab, until it closes), or in localStorage when
// the user ticks "remember"; never in both. Storage can be disabled (private modes): the
// token then lives in the field only.
function storeToken(value, remember) {
  try {
    sessionStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(TOKEN_KEY);
    if (value) (remember ? localStorage : sessionStorage).setItem(TOKEN_KEY, value);
  } catch { /* not stored */ }
}

// [token, remembered]
function storedToken() {
  try {
    const session = sessionStorage.getItem(TOKEN_KEY);
    if (session) return [session, false];
    const kept = localStorage.getItem(TOKEN_KEY);
    return kept ? [kept, true] : ['', false];
  } catch { return ['', false]; }
}

// Text between backticks is shown as <code>; every part goes in as text, never as HTML.
function putText(box, text) {
  box.replaceChildren();
  String(text || '').split('`').forEach((part, i) => {
    if (part) box.append(i % 2 ? el('code', '', part) : document.createTextNode(part));
  });
}

function setMessage(text, kind = 'info') {
  const box = $('message');
  putText(box, text);
  box.className = text ? `message ${kind}` : 'message';
}

function showError(err, what) {
  if (err.status === 401) {
    setMessage(`The token was refused (401): check it, or ${CREATE_HINT}. Server: ${err.message}`, 'error');
  } else {
    setMessage(`${what} failed (${err.status || 'no response'}): ${err.message}`, 'error');
  }
}

// User seeds may exceed 2^53: long ones are kept as strings so they print exactly.
function parseJson(text) {
  return JSON.parse(text.replace(/("seed"\s*:\s*)(\d{16,})/g, '$1"$2"'));
}

// JSON.stringify refuses BigInt: such seeds are spliced in as bare digits.
function toJson(value) {
  return JSON.stringify(value, (_key, v) => (typeof v === 'bigint' ? `#big${v}#` : v))
    .replace(/"#big(\d+)#"/g, '$1');
}

async function api(method, path, body) {
  const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : toJson(body) });
  } catch (err) {
    throw apiError(0, `the server could not be reached (${err.message})`);
  }
  const text = await res.text();
  let data = null;
  try { data = text ? parseJson(text) : null; } catch { /* not JSON: the text is the message */ }
  if (!res.ok) throw apiError(res.status, (data && data.error_message) || text.slice(0, 300) || res.statusText);
  return data;
}

function resolveRef(root, node) {
  if (!node || typeof node.$ref !== 'string' || !node.$ref.startsWith('#/')) return node || {};
  const target = node.$ref.slice(2).split('/').reduce((at, key) => (at ? at[key] : undefined), root);
  return target || {};
}

const typeOf = (s) => (Array.isArray(s.type) ? s.type.find((t) => t !== 'null') : s.type);
const variants = (root, prop) => (prop.anyOf || prop.oneOf || [prop]).map((v) => resolveRef(root, v));
// Bounds past 2^53 (the seed's 2^63 - 1) would print wrong: they are left out.
const safeNumber = (n) => (typeof n === 'number' && Math.abs(n) <= Number.MAX_SAFE_INTEGER ? n : undefined);

function boundsText(s) {
  const lo = safeNumber(s.minimum);
  const hi = safeNumber(s.maximum);
  const parts = [];
  if (lo !== undefined && hi !== undefined) parts.push(`Range ${lo} to ${hi}`);
  else if (lo !== undefined) parts.push(`At least ${lo}`);
  else if (hi !== undefined) parts.push(`At most ${hi}`);
  if (s.multipleOf) parts.push(`multiples of ${s.multipleOf}`);
  if (s.maxLength) parts.push(`up to ${s.maxLength} characters`);
  const text = parts.join(', ');
  return text ? `${text[0].toUpperCase()}${text.slice(1)}.` : '';
}

// A labelled block: title as label, description and bounds as help text.
function wrap(id, name, prop, control, bounds) {
  const block = el('div', 'field');
  const label = el('label', '', prop.title || name);
  label.htmlFor = id;
  control.id = id;
  block.append(label, control);
  const help = el('p', 'help');
  putText(help, [PLAIN_HELP[name] || prop.description, bounds].filter(Boolean).join(' '));
  help.id = `${id}-help`;
  control.setAttribute('aria-describedby', help.id);
  block.append(help);
  return block;
}

function readNumber(raw, integer) {
  const text = raw.trim();
  if (text === '') return undefined;
  if (integer && /^\d{16,}$/.test(text)) return BigInt(text); // Number would round it
  return Number(text);
}

// Fine steps for a small range (a strength of 0 to 1), coarser for a wide one.
function numberStep(s) {
  const lo = safeNumber(s.minimum);
  const hi = safeNumber(s.maximum);
  return lo !== undefined && hi !== undefined && hi - lo <= 10 ? 0.01 : 0.1;
}

function numberField(name, prop, s) {
  const input = el('input');
  const integer = typeOf(s) === 'integer';
  input.type = 'number';
  input.inputMode = integer ? 'numeric' : 'decimal';
  setAttr(input, 'min', safeNumber(s.minimum));
  setAttr(input, 'max', safeNumber(s.maximum));
  input.step = String(s.multipleOf || (integer ? 1 : numberStep(s)));
  if (typeof prop.default === 'number') input.value = String(prop.default);
  if (name === 'seed') input.placeholder = 'random';
  const element = wrap(`field-${name}`, name, prop, input, boundsText(s));
  return { element, input, read: () => readNumber(input.value, integer) };
}

function textField(name, prop, s, required) {
  const area = el('textarea');
  area.rows = required ? 6 : 2;
  area.required = required;
  setAttr(area, 'minlength', s.minLength);
  setAttr(area, 'maxlength', s.maxLength);
  if (typeof prop.default === 'string') {
    area.value = prop.default.length > LONG_DEFAULT && required ? SHORT_PROMPT : prop.default;
  }
  const element = wrap(`field-${name}`, name, prop, area, boundsText(s));
  return { element, read: () => (area.value === '' ? undefined : area.value) };
}

// Without a default, a custom side starts at half the maximum, on the step grid.
function startSide(s) {
  if (typeof s.default === 'number') return s.default;
  const step = s.multipleOf || 1;
  const side = Math.round((safeNumber(s.maximum) || 1024) / 2 / step) * step;
  return Math.max(side, safeNumber(s.minimum) || 0);
}

function customBox(root, object) {
  const box = el('div', 'custom-size');
  const parts = Object.entries(object.properties).map(([key, sub]) => {
    const s = resolveRef(root, sub);
    const field = numberField(key, s, s);
    if (field.input.value === '') field.input.value = String(startSide(s));
    field.input.required = true;
    box.append(field.element);
    return [key, field];
  });
  return {
    element: box,
    inputs: parts.map(([, field]) => field.input),
    read: () => Object.fromEntries(parts.map(([key, field]) => [key, field.read()])),
  };
}

// "landscape_16_9" reads as "landscape 16:9".
const prettify = (value) => String(value).replace(/_(\d+)_(\d+)$/, ' $1:$2').replace(/_/g, ' ');

function selectField(root, name, prop, values, object) {
  const select = el('select');
  values.forEach((value) => select.append(new Option(prettify(value), String(value))));
  const custom = object ? customBox(root, object) : null;
  if (custom) select.append(new Option('custom size', 'custom'));
  if (values.includes(prop.default)) select.value = String(prop.default);
  const element = wrap(`field-${name}`, name, prop, select, '');
  if (custom) {
    // Hidden inputs are disabled too, so the browser does not validate them.
    const sync = () => {
      custom.element.hidden = select.value !== 'custom';
      custom.inputs.forEach((input) => { input.disabled = custom.element.hidden; });
    };
    select.addEventListener('change', sync);
    sync();
    element.append(custom.element);
  }
  const read = () => (select.value === 'custom' && custom ? custom.read() : values[select.selectedIndex]);
  return { element, read };
}

const sizeText = (bytes) => (bytes >= 1e6 ? `${(bytes / 1e6).toFixed(1)} MB` : `${Math.max(1, Math.round(bytes / 1e3))} KB`);

// The image type from the file's first bytes (the name and the browser's guess may lie);
// the server judges the content again.
async function sniffImage(file) {
  const head = new Uint8Array(await file.slice(0, 12).arrayBuffer());
  const ascii = (from, to) => String.fromCharCode(...head.slice(from, to));
  if (head[0] === 0x89 && ascii(1, 4) === 'PNG') return 'image/png';
  if (head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff) return 'image/jpeg';
  if (ascii(0, 4) === 'RIFF' && ascii(8, 12) === 'WEBP') return 'image/webp';
  return '';
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error || new Error('unreadable'));
    reader.readAsDataURL(file);
  });
}

// An image input: a file (picker, drop or paste) sent as a data:image/...;base64, URI with
// a preview, or else the URL typed below it. The file is checked for its type and size here
// so that a wrong one is said at once; the server checks both again, and more.
function imageField(name, prop, required) {
  const id = `field-${name}`;
  const block = el('fieldset', 'field image-field');
  block.id = `${id}-box`;
  const title = (prop.title || name).replace(/\s*URL$/i, '') || 'Image';
  block.append(el('legend', '', required ? title : `${title} (optional)`));

  const zone = el('div', 'dropzone');
  const file = el('input');
  file.type = 'file';
  file.id = `${id}-file`;
  file.accept = 'image/png,image/jpeg,image/webp';
  const fileLabel = el('label', '', `Drop an image here, paste one, or choose a file (${IMAGE_TYPES}, up to ${sizeText(MAX_IMAGE_BYTES)})`);
  fileLabel.htmlFor = file.id;
  const error = el('p', 'field-error');
  error.id = `${id}-error`;
  error.setAttribute('role', 'alert');
  const preview = el('figure', 'preview');
  preview.hidden = true;
  const img = el('img');
  img.id = `${id}-preview`;
  const caption = el('figcaption');
  const remove = el('button', '', 'Remove image');
  remove.type = 'button';
  preview.append(img, caption, remove);
  zone.append(fileLabel, file, preview, error);

  const urlLabel = el('label', 'url-label', 'Or the image’s URL');
  const url = el('input');
  url.type = 'url';
  url.id = id;
  url.placeholder = 'https://…';
  url.autocomplete = 'off';
  url.spellcheck = false;
  urlLabel.htmlFor = id;
  const help = el('p', 'help');
  help.id = `${id}-help`;
  putText(help, 'A file is sent with the request, inside it; a URL is fetched by the server when you submit. The server takes PNG, JPEG and WEBP and has its own size limits.');
  file.setAttribute('aria-describedby', `${help.id} ${error.id}`);
  url.setAttribute('aria-describedby', help.id);
  block.append(zone, urlLabel, url, help);

  let dataUri = '';
  let loads = 0; // a slow read of an earlier file must not replace a newer one
  const sync = () => {
    file.required = required && !dataUri && !url.value.trim();
    url.disabled = Boolean(dataUri);
  };
  const fail = (text) => {
    error.textContent = text;
    file.setAttribute('aria-invalid', 'true');
  };
  const clear = () => {
    loads += 1;
    dataUri = '';
    file.value = '';
    img.removeAttribute('src');
    img.alt = '';
    caption.textContent = '';
    preview.hidden = true;
    sync();
  };
  const take = async (chosen) => {
    clear();
    error.textContent = '';
    file.removeAttribute('aria-invalid');
    if (!chosen) return;
    const gen = loads;
    if (chosen.size > MAX_IMAGE_BYTES) {
      fail(`${chosen.name} is ${sizeText(chosen.size)}: the playground sends images up to ${sizeText(MAX_IMAGE_BYTES)} (the request carries the image, a third larger once encoded). Use a smaller image, or give its https URL below.`);
      return;
    }
    let type;
    let text;
    try {
      type = await sniffImage(chosen);
      text = type ? await readDataUrl(chosen) : '';
    } catch (err) {
      if (gen === loads) fail(`${chosen.name} could not be read (${err.message}).`);
      return;
    }
    if (gen !== loads) return;
    if (!type) {
      fail(`${chosen.name} is not a ${IMAGE_TYPES} image.`);
      return;
    }
    dataUri = `data:${type};base64,${text.slice(text.indexOf(',') + 1)}`;
    img.onload = () => {
      if (gen === loads) caption.textContent = `${chosen.name} · ${img.naturalWidth}×${img.naturalHeight} · ${sizeText(chosen.size)}`;
    };
    img.onerror = () => {
      if (gen !== loads) return;
      clear();
      fail(`${chosen.name} could not be shown: it is damaged or not a ${IMAGE_TYPES} image.`);
    };
    img.src = dataUri; // a data: URI: the page's CSP allows these images, not blob: ones
    img.alt = `The input image, ${chosen.name}`;
    caption.textContent = `${chosen.name} · ${sizeText(chosen.size)}`;
    preview.hidden = false;
    sync();
  };

  file.addEventListener('change', () => take(file.files && file.files[0]));
  url.addEventListener('input', sync);
  remove.addEventListener('click', () => {
    take(null);
    file.focus();
  });
  zone.addEventListener('dragover', (event) => {
    event.preventDefault();
    event.dataTransfer.dropEffect = 'copy';
    zone.classList.add('dragging');
  });
  zone.addEventListener('dragleave', () => zone.classList.remove('dragging'));
  zone.addEventListener('drop', (event) => {
    event.preventDefault();
    zone.classList.remove('dragging');
    const dropped = event.dataTransfer.files;
    if (!dropped || !dropped.length) return;
    take(dropped[0]).then(() => {
      // The picker shows the dropped file too, so the form's own check sees it.
      try { if (dataUri) file.files = dropped; } catch { /* an older browser: dataUri is what counts */ }
    });
  });
  sync();
  return {
    element: block,
    read: () => dataUri || url.value.trim() || undefined,
    paste: (pasted) => take(pasted),
  };
}

// Rows of an array of objects (loras: {path, scale}, at most maxItems): add and remove, each
// row's fields from the item schema. Empty, the field is not sent (the server's default).
function rowsField(root, name, prop, list, required) {
  const id = `field-${name}`;
  const item = resolveRef(root, list.items);
  const itemRequired = item.required || [];
  const words = ROWS_TEXT[name] || { legend: prop.title || name, add: 'Add a row', row: 'Row' };
  const plain = ITEM_TEXT[name] || {};
  const max = safeNumber(list.maxItems);
  const min = Math.max(safeNumber(list.minItems) || 0, required ? 1 : 0);
  const block = el('fieldset', 'field rows-field');
  block.id = id;
  block.append(el('legend', '', words.legend));
  const help = el('p', 'help');
  help.id = `${id}-help`;
  const limit = max === undefined ? '' : `Up to ${max}.`;
  // What each column means, said once for all rows.
  const columns = Object.entries(item.properties || {}).map(([key, sub]) => {
    const s = resolveRef(root, sub);
    const scalar = variants(root, s).find((v) => typeOf(v) && typeOf(v) !== 'null') || {};
    const [label, text] = plain[key] || [s.title || key, s.description];
    const bounds = ['integer', 'number'].includes(typeOf(scalar)) ? boundsText(scalar) : '';
    const said = [text, bounds].filter(Boolean).join(' ');
    return said ? `${label}: ${said[0].toLowerCase()}${said.slice(1)}` : '';
  });
  putText(help, [PLAIN_HELP[name] || prop.description, limit, ...columns].filter(Boolean).join(' '));
  block.setAttribute('aria-describedby', help.id);
  const rows = el('ol', 'rows');
  const add = el('button', 'add-row', words.add);
  add.type = 'button';
  add.id = `${id}-add`;
  block.append(help, rows, add);
  // Suggestions for a LoRA's path: the operator's LoRAs, once a token may list them.
  const names = name === 'loras' ? el('datalist') : null;
  if (names) {
    names.id = `${id}-names`;
    block.append(names);
  }

  let made = 0; // ids stay unique as rows come and go
  const live = [];
  const sync = () => {
    add.disabled = max !== undefined && live.length >= max;
    live.forEach((row, i) => {
      row.remove.disabled = live.length <= min;
      row.remove.setAttribute('aria-label', `Remove ${words.row} ${i + 1}`);
      row.element.setAttribute('aria-label', `${words.row} ${i + 1}`);
    });
  };
  const addRow = () => {
    made += 1;
    const element = el('li', 'row');
    element.setAttribute('role', 'group');
    const parts = Object.entries(item.properties || {}).map(([key, sub]) => {
      const s = resolveRef(root, sub);
      const kinds = variants(root, s);
      const scalar = kinds.find((v) => typeOf(v) && typeOf(v) !== 'null') || {};
      const integer = typeOf(scalar) === 'integer';
      const numeric = integer || typeOf(scalar) === 'number';
      const input = el('input');
      input.id = `${id}-${made}-${key}`;
      input.name = key;
      if (names && key === 'path') input.setAttribute('list', names.id);
      input.required = itemRequired.includes(key);
      if (numeric) {
        input.type = 'number';
        input.inputMode = integer ? 'numeric' : 'decimal';
        setAttr(input, 'min', safeNumber(scalar.minimum));
        setAttr(input, 'max', safeNumber(scalar.maximum));
        input.step = String(scalar.multipleOf || (integer ? 1 : numberStep(scalar)));
        if (typeof s.default === 'number') input.value = String(s.default);
      } else {
        input.type = 'text';
        input.autocomplete = 'off';
        input.spellcheck = false;
        setAttr(input, 'maxlength', scalar.maxLength);
        if (typeof s.default === 'string') input.value = s.default;
        if (name === 'loras' && key === 'path') input.placeholder = 'a name, owner/repo or https://…';
      }
      input.setAttribute('aria-describedby', help.id);
      const cell = el('div', `cell cell-${key}`);
      const tag = el('label', '', (plain[key] || [s.title || key])[0]);
      tag.htmlFor = input.id;
      cell.append(tag, input);
      element.append(cell);
      return [key, input, numeric, integer];
    });
    const remove = el('button', 'remove-row', 'Remove');
    remove.type = 'button';
    element.append(remove);
    const row = {
      element,
      remove,
      read: () => Object.fromEntries(parts
        .map(([key, input, numeric, integer]) => [key, numeric ? readNumber(input.value, integer) : input.value.trim()])
        .filter(([, value]) => value !== undefined && value !== '' && !Number.isNaN(value))),
    };
    remove.addEventListener('click', () => {
      const at = live.indexOf(row);
      live.splice(at, 1);
      element.remove();
      sync();
      const next = live[Math.min(at, live.length - 1)];
      (next ? next.element.querySelector('input') : add).focus();
    });
    live.push(row);
    rows.append(element);
    sync();
    return row;
  };
  add.addEventListener('click', () => {
    if (add.disabled) return;
    addRow().element.querySelector('input').focus();
  });
  for (let i = 0; i < min; i += 1) addRow();
  sync();
  return {
    element: block,
    read: () => (live.length || required ? live.map((row) => row.read()) : undefined),
    names: names ? (list) => names.replaceChildren(...list.map((value) => new Option(value, value))) : null,
  };
}

// The operator's LoRAs (GET /v1/loras, for token holders) as suggestions in the LoRA rows.
// A server without the route, or a token it refuses, leaves the rows without suggestions.
async function loadLoraNames() {
  const field = state.fields.find((f) => f.names);
  if (!field || !token()) return;
  const gen = state.modelGen;
  try {
    const page = await api('GET', '/v1/loras');
    const list = ((page && page.loras) || []).map((entry) => entry && entry.name).filter((n) => typeof n === 'string');
    if (gen === state.modelGen) field.names(list);
  } catch { /* no suggestions */ }
}

// A choice's values: every variant's enum and const ("auto" or a preset), in order.
function choices(kinds) {
  return kinds.flatMap((v) => (Array.isArray(v.enum) ? v.enum : 'const' in v ? [v.const] : []))
    .filter((value) => value !== null);
}

// image_url, or any other field whose name ends so: a string the server fetches or decodes.
const isImageField = (name, type) => type === 'string' && /(^|_)image_url$/.test(name);

function makeField(root, name, prop, required) {
  const kinds = variants(root, prop);
  const values = choices(kinds);
  const object = kinds.find((v) => typeOf(v) === 'object' && v.properties);
  const list = kinds.find((v) => typeOf(v) === 'array');
  const scalar = kinds.find((v) => typeOf(v) && typeOf(v) !== 'null') || {};
  const type = typeOf(scalar);
  if (values.length) return selectField(root, name, prop, values, object);
  if (list && typeOf(resolveRef(root, list.items)) === 'object') return rowsField(root, name, prop, list, required);
  if (isImageField(name, type)) return imageField(name, prop, required);
  if (type === 'integer' || type === 'number') return numberField(name, prop, scalar);
  return textField(name, prop, scalar, required);
}

function buildForm(schema) {
  const required = schema.required || [];
  const box = $('fields');
  box.replaceChildren();
  state.fields = Object.entries(schema.properties || {}).map(([name, prop]) => {
    const field = makeField(schema, name, prop || {}, required.includes(name));
    box.append(field.element);
    return { name, read: field.read, paste: field.paste, names: field.names };
  });
}

// An image pasted anywhere on the page goes to the form's first image field.
function onPaste(event) {
  const files = [...((event.clipboardData && event.clipboardData.files) || [])];
  const image = files.find((file) => file.type.startsWith('image/'));
  const field = state.fields.find((f) => f.paste);
  if (!image || !field) return;
  event.preventDefault();
  field.paste(image);
}

// A file dropped beside a drop zone is ignored, rather than opened in place of the page
// (and the form with it).
function onStrayDrop(event) {
  if (event.dataTransfer && [...event.dataTransfer.types].includes('Files')) event.preventDefault();
}

// Only fields with a value are sent: the server applies its defaults to the rest.
function readInput() {
  const input = {};
  for (const { name, read } of state.fields) {
    const value = read();
    if (value !== undefined && !Number.isNaN(value)) input[name] = value;
  }
  return input;
}

function showModel(model) {
  $('model-name').textContent = model.display_name || model.model_id || state.modelId;
  const price = typeof model.base_price_usd === 'number'
    ? `US$${model.base_price_usd} per ${model.price_unit || 'output'}` : '';
  $('model-description').textContent = [model.description, price].filter(Boolean).join(' · ');
}

// The served models, for the picker: the playground's public list, no token needed.
async function loadModels() {
  try {
    const page = await api('GET', '/playground/models');
    state.models = (page.models || []).filter((m) => typeof m.model_id === 'string');
  } catch (err) {
    state.models = [];
    showError(err, 'Listing the models');
  }
  const picker = $('model');
  picker.replaceChildren(...state.models.map((m) => new Option(
    m.display_name && m.display_name !== m.model_id ? `${m.display_name} (${m.model_id})` : m.model_id, m.model_id,
  )));
  const ids = state.models.map((m) => m.model_id);
  state.modelId = ids.includes(DEFAULT_MODEL) || !ids.length ? DEFAULT_MODEL : ids[0];
  picker.value = state.modelId;
  picker.disabled = ids.length < 2;
  loadModel();
}

// The model's description comes from the playground's public route: no token needed.
async function loadModel() {
  const gen = ++state.modelGen;
  state.ready = false;
  $('submit').disabled = true;
  setMessage('Loading the model…');
  try {
    const model = await api('GET', `/playground/models/${state.modelId}`);
    if (gen !== state.modelGen) return;
    showModel(model);
    buildForm(model.input_schema || {});
    state.ready = true;
    $('submit').disabled = false;
    setMessage(token() ? '' : 'Paste an API token above to submit.');
    if (token()) {
      loadGallery(true);
      loadLoraNames();
    }
  } catch (err) {
    if (gen === state.modelGen) showError(err, 'Loading the model');
  }
}

// Submitting without a token asks for one; the submit goes ahead once it is entered.
function askForToken() {
  state.pending = true;
  const field = $('token');
  field.setAttribute('aria-invalid', 'true');
  field.focus();
  setMessage(`Enter your API token to submit: paste it above, or ${CREATE_HINT}.`, 'error');
}

const requestPath = (id, action) => `/v1/requests/${encodeURIComponent(id)}/${action}`;

function setCancelable(active) {
  if (state.job) state.job.active = active;
  $('cancel').disabled = !(active && state.job && !state.job.cancelling);
}

function resetResult() {
  $('result-image').hidden = true;
  $('result-image').removeAttribute('src');
  $('result-link').removeAttribute('href');
  $('result-seed').textContent = '—';
  $('result-timings').textContent = '—';
  $('progress').value = 0;
}

const STATUS_TEXT = { in_progress: 'Running', completed: 'Done', succeeded: 'Done', cancelled: 'Cancelled', failed: 'Failed' };

function showStatus(s) {
  const bar = $('progress');
  let text = STATUS_TEXT[s.status] || s.status;
  if (s.status === 'in_queue') {
    text = s.queue_position == null ? 'In queue' : `In queue, position ${s.queue_position} (0 = next)`;
    bar.value = 0;
  } else if (s.status === 'in_progress' && s.progress) {
    text = `Running step ${s.progress.step} of ${s.progress.total}`;
    bar.max = s.progress.total;
    bar.value = s.progress.step;
  } else if (text === 'Done') {
    bar.value = bar.max;
  }
  $('status').textContent = text;
  setCancelable(!FINAL.has(s.status));
}

const seconds = (from, to) => ((Date.parse(to) - Date.parse(from)) / 1000).toFixed(1);

function timings(r) {
  const parts = [];
  if (r.created_at && r.started_at) parts.push(`queue wait ${seconds(r.created_at, r.started_at)} s`);
  if (r.started_at && r.finished_at) parts.push(`run time ${seconds(r.started_at, r.finished_at)} s`);
  const text = parts.join(', ');
  return text ? `${text[0].toUpperCase()}${text.slice(1)}` : '—';
}

function showResult(r) {
  if (r.status === 'failed') {
    const message = (r.error && r.error.message) || 'unknown error';
    $('status').textContent = `Failed: ${message}`;
    setMessage(`The job failed${r.error ? ` (${r.error.type})` : ''}: ${message}`, 'error');
  }
  const url = safeUrl(r.output && r.output.image);
  if (url) {
    const img = $('result-image');
    img.src = url;
    img.alt = state.job && state.job.prompt ? state.job.prompt.slice(0, 300) : 'Generated image';
    img.hidden = false;
    $('result-link').href = url;
  }
  $('result-seed').textContent = r.seed == null ? '—' : String(r.seed);
  $('result-timings').textContent = timings(r);
}

async function finish(gen, id, status) {
  loadGallery(true);
  if (status === 'cancelled') return;
  try {
    const result = await api('GET', requestPath(id, 'result'));
    if (gen === state.jobGen) showResult(result);
  } catch (err) {
    if (gen === state.jobGen) showError(err, 'Fetching the result');
  }
}

async function poll(gen, id) {
  if (gen !== state.jobGen) return;
  let status;
  try {
    status = await api('GET', requestPath(id, 'status'));
  } catch (err) {
    if (gen !== state.jobGen) return;
    showError(err, 'Checking the status');
    // Network trouble, overload and server errors may pass: keep following, slower.
    if (err.status === 0 || err.status === 429 || err.status >= 500) setTimeout(() => poll(gen, id), RETRY_MS);
    else setCancelable(false);
    return;
  }
  if (gen !== state.jobGen) return;
  showStatus(status);
  if (FINAL.has(status.status)) finish(gen, id, status.status);
  else setTimeout(() => poll(gen, id), POLL_MS);
}

// Splits a text/event-stream into (event, data) pairs; comments (the keep-alive) are skipped.
function sseEvents(buffer) {
  const events = [];
  let end;
  while ((end = buffer.indexOf('\n\n')) >= 0) {
    const block = buffer.slice(0, end);
    buffer = buffer.slice(end + 2);
    let name = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (line.startsWith('event:')) name = line.slice(6).trim();
      else if (line.startsWith('data:')) data.push(line.slice(5).trimStart());
    }
    if (data.length) events.push([name, parseJson(data.join('\n'))]);
  }
  return { events, rest: buffer };
}

// Follows the job's status stream (every step, as it happens); polls instead where the
// stream cannot be had or breaks off.
async function stream(gen, id) {
  const controller = new AbortController();
  state.streamAbort = controller;
  try {
    const res = await fetch(requestPath(id, 'stream'), {
      headers: { Authorization: `Bearer ${token()}` },
      signal: controller.signal,
    });
    if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done || gen !== state.jobGen) break;
      const parsed = sseEvents(buffer + value);
      buffer = parsed.rest;
      for (const [name, body] of parsed.events) {
        if (name === 'status') showStatus(body);
        if (name === 'result') {
          loadGallery(true);
          if (body.status !== 'cancelled') showResult(body);
          controller.abort();
          return;
        }
      }
    }
  } catch {
    // Aborted for a newer job, or the stream failed: polling takes over below.
  }
  controller.abort();
  if (gen === state.jobGen) poll(gen, id);
}

function follow(id, prompt) {
  const gen = ++state.jobGen; // an older job's loop sees the change and stops
  if (state.streamAbort) state.streamAbort.abort();
  state.job = { id, prompt, cancelling: false };
  resetResult();
  $('status').textContent = 'Submitted';
  setCancelable(true);
  stream(gen, id);
}

async function submit(event) {
  event.preventDefault();
  if (!state.ready) return;
  if (token() !== state.token) {
    // A token typed a moment ago, not yet taken in: take it now, or it would stop
    // following this job once it settled. This submit is the one a pending one waited for.
    state.pending = false;
    onTokenChange();
  }
  if (!token()) {
    askForToken();
    return;
  }
  state.pending = false;
  const input = readInput();
  $('submit').disabled = true;
  try {
    const job = await api('POST', `/v1/models/${state.modelId}`, input);
    setMessage('');
    follow(job.request_id, typeof input.prompt === 'string' ? input.prompt : '');
    loadGallery(true);
    if (window.matchMedia('(max-width: 699px)').matches) $('result-panel').scrollIntoView({ block: 'start' });
  } catch (err) {
    state.pending = err.status === 401; // a wrong token: the next one entered tries again
    showError(err, 'Submitting');
  } finally {
    $('submit').disabled = !state.ready;
  }
}

async function cancelJob() {
  const job = state.job;
  if (!job) return;
  job.cancelling = true;
  setCancelable(false);
  try {
    const answer = await api('POST', requestPath(job.id, 'cancel'));
    if (job === state.job) setMessage(OUTCOMES[answer.outcome] || `Cancel: ${answer.outcome}`);
  } catch (err) {
    job.cancelling = false;
    if (job === state.job) showError(err, 'Cancelling');
  }
}

function when(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? '' : date.toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'short' });
}

// The server's small JPEG of one of its own signed file links (same signature); a link
// elsewhere (an object store's) is shown as it is.
function thumbnailUrl(url) {
  let parsed;
  try { parsed = new URL(url, window.location.href); } catch { return url; }
  if (parsed.origin !== window.location.origin || !parsed.pathname.startsWith('/files/')) return url;
  return `/playground/thumbnails/${parsed.pathname.slice('/files/'.length)}${parsed.search}`;
}

// A tile: the thumbnail, and beside it the start of the prompt, then seed, state and time.
function card(r) {
  const item = el('li', `card status-${r.status}`);
  const url = r.status === 'succeeded' ? safeUrl(r.output && r.output.image) : '';
  if (url) {
    const link = Object.assign(el('a', 'thumb'), { href: url, target: '_blank', rel: 'noopener' });
    const img = Object.assign(el('img'), {
      loading: 'lazy', src: thumbnailUrl(url), alt: r.prompt_start || `Generated image, seed ${r.seed}`,
    });
    item.append(link);
    link.append(img);
  } else {
    item.append(el('div', 'thumb placeholder', prettify(r.status)));
  }
  const text = el('div', 'card-text');
  const prompt = typeof r.prompt_start === 'string' ? r.prompt_start : '';
  text.append(el('p', 'prompt', prompt.length >= 120 ? `${prompt}…` : prompt));
  const model = state.models.length > 1 && r.model_id ? r.model_id : '';
  const meta = [model, r.seed == null ? '' : `seed ${r.seed}`, prettify(r.status), when(r.created_at)];
  text.append(el('p', 'meta', meta.filter(Boolean).join(' · ')));
  if (r.error && r.error.message) text.append(el('p', 'meta error', r.error.message));
  item.append(text);
  return item;
}

async function loadGallery(reset) {
  if (!reset && !state.cursor) return;
  const gen = reset ? ++state.galleryGen : state.galleryGen;
  const more = $('gallery-more');
  const query = `limit=${PAGE_SIZE}${reset ? '' : `&cursor=${encodeURIComponent(state.cursor)}`}`;
  more.disabled = true;
  try {
    const page = await api('GET', `/playground/requests?${query}`);
    if (gen !== state.galleryGen) return;
    const list = $('gallery');
    if (reset) list.replaceChildren();
    list.append(...(page.requests || []).map(card));
    if (!list.children.length) list.append(el('li', 'empty muted', 'No requests yet.'));
    state.cursor = page.next_cursor || null;
    more.hidden = !state.cursor;
  } catch (err) {
    if (gen === state.galleryGen) showError(err, 'Loading recent requests');
  } finally {
    if (gen === state.galleryGen) more.disabled = false;
  }
}

// Typing or pasting fires "input": act once the field stops changing (a paste at once).
function onTokenInput() {
  clearTimeout(state.tokenTimer);
  state.tokenTimer = setTimeout(onTokenChange, TOKEN_SETTLE_MS);
}

function onTokenChange() {
  clearTimeout(state.tokenTimer);
  if (token() === state.token) return; // "change" after "input" already handled it
  state.token = token();
  storeToken(token(), $('remember').checked);
  $('token').removeAttribute('aria-invalid');
  if (state.job && state.job.active) $('status').textContent = 'Stopped following the job: the token changed.';
  state.jobGen += 1; // the old token cannot see its jobs
  setCancelable(false);
  state.galleryGen += 1;
  state.cursor = null;
  $('gallery').replaceChildren();
  $('gallery-more').hidden = true;
  if (!token()) {
    setMessage('Paste an API token above to submit.');
    return;
  }
  setMessage('');
  if (state.pending && state.ready) $('form').requestSubmit();
  loadGallery(true);
  loadLoraNames();
}

function start() {
  const [saved, remembered] = storedToken();
  $('token').value = saved;
  state.token = saved;
  $('remember').checked = remembered;
  $('token').addEventListener('input', onTokenInput);
  $('token').addEventListener('change', onTokenChange);
  $('model').addEventListener('change', () => {
    state.modelId = $('model').value;
    loadModel();
  });
  $('remember').addEventListener('change', () => storeToken(token(), $('remember').checked));
  $('form').addEventListener('submit', submit);
  $('cancel').addEventListener('click', cancelJob);
  $('gallery-more').addEventListener('click', () => loadGallery(false));
  document.addEventListener('paste', onPaste);
  document.addEventListener('dragover', onStrayDrop);
  document.addEventListener('drop', onStrayDrop);
  loadModels();
}

start();
