// The page of `t0s1 serve`: a client of the server's own OpenAI-compatible API.
// Model text only ever reaches the DOM as text (textContent, append(string)): never as markup.

const KEY_STORAGE = "t0s1.apiKey";
const BUDGET_PATTERN = /^(auto|\d+)$/;
const $ = (id) => document.getElementById(id);

let info = null;
const conversation = [];  // {role, content}: the answers, not the thinking (as `t0s1 chat` keeps it)
let chatController = null;
let compareController = null;
let followChat = () => {};

class InputError extends Error {}
class AuthError extends Error {}

// ---- the API -----------------------------------------------------------------------------------

async function api(path, init = {}) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  const headers = new Headers(init.headers);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  if (init.body) headers.set("Content-Type", "application/json");
  const response = await fetch(path, { ...init, headers });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_STORAGE);
    const message = key
      ? "The server refused the API key this page had: wrong API key. Enter the right one."
      : "This server requires an API key.";
    askForKey(message);
    throw new AuthError(key ? "Wrong API key: enter the right one, then send again."
                            : "This server requires an API key: enter it, then send again.");
  }
  if (!response.ok) {
    throw new Error(`${response.status}: ${await errorMessage(response)}`);
  }
  return response;
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error.message;
  } catch {
    return text || response.statusText;
  }
}

// Server-sent events of a streamed chat completion: yields the parsed chunks until [DONE].
async function* streamChat(body, signal) {
  const response = await api("/v1/chat/completions", {
    method: "POST", body: JSON.stringify({ ...body, stream: true }), signal,
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("The connection closed before the reply was complete.");
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      yield chunk;
    }
  }
}

// Streams one reply into `view`; returns the answer text.
async function runReply(view, body, signal) {
  let finishReason = null;
  let answer = "";
  for await (const chunk of streamChat(body, signal)) {
    if (chunk.sources) view.setSources(chunk.sources);
    for (const choice of chunk.choices || []) {
      const delta = choice.delta || {};
      // The server sends the thinking twice (reasoning_content and its alias reasoning): show one.
      const thinking = delta.reasoning_content ?? delta.reasoning;
      if (thinking) view.addThinking(thinking);
      if (delta.content) {
        answer += delta.content;
        view.addAnswer(delta.content);
      }
      if (delta.sources) view.setSources(delta.sources);
      finishReason = choice.finish_reason || finishReason;
    }
    if (chunk.budget_forcing) view.finish(chunk.budget_forcing, finishReason);
  }
  if (view.root.dataset.state !== "done") view.finish(null, finishReason);  // a server without budget_forcing
  return answer;
}

// ---- the API key -------------------------------------------------------------------------------

function askForKey(message) {
  $("key-message").textContent = message;
  $("key-error").hidden = true;
  $("key-input").value = "";
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

async function submitKey(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  const error = $("key-error");
  if (!key) return;
  $("key-submit").disabled = true;
  try {
    const response = await fetch("/v1/models", { headers: { Authorization: `Bearer ${key}` } });
    if (response.status === 401) {
      error.textContent = "Wrong API key: the server refused it.";
      error.hidden = false;
      $("key-input").select();
      return;
    }
    if (!response.ok) throw new Error(`${response.status}: ${await errorMessage(response)}`);
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key-dialog").close();
  } catch (problem) {
    error.textContent = `Could not check the key: ${problem.message}`;
    error.hidden = false;
  } finally {
    $("key-submit").disabled = false;
  }
}

// ---- controls ----------------------------------------------------------------------------------

function parseBudget(text) {
  const budget = text.trim().toLowerCase();
  if (!BUDGET_PATTERN.test(budget)) {
    throw new InputError(`A thinking budget is a whole number of tokens or auto, not "${text.trim()}".`);
  }
  return budget === "auto" ? "auto" : Number(budget);
}

function wholeNumber(id, label, least) {
  const value = $(id).value.trim();
  if (!/^\d+$/.test(value) || Number(value) < least) {
    throw new InputError(`${label} must be a whole number of at least ${least}.`);
  }
  return Number(value);
}

// The request's budget forcing fields, from the controls (an InputError names a bad one).
function requestSettings() {
  const temperature = Number($("temperature").value);
  if ($("temperature").value.trim() === "" || !(temperature >= 0)) {
    throw new InputError("Temperature must be a number of at least 0.");
  }
  return {
    max_thinking_tokens: parseBudget($("budget").value),
    num_ignore: wholeNumber("num-ignore", "Waits (num_ignore)", 0),
    ignore_str: ignoreString(),
    temperature,
    max_tokens: wholeNumber("max-answer", "Answer tokens", 1),
  };
}

// The server's default ignore_str, whole: a one-line field drops its line breaks (s1's is "Wait",
// but a server may be started with --ignore-str $'\n\nWait').
let defaultIgnoreString = "";

// What the ignore_str field asks for: the server's default, line breaks included, while it shows it.
function ignoreString() {
  const shown = $("ignore-str").value;
  return shown === defaultIgnoreString.replace(/[\r\n]/g, "") ? defaultIgnoreString : shown;
}

function settingsOrShow(errorId) {
  const error = $(errorId);
  try {
    const settings = requestSettings();
    error.hidden = true;
    return settings;
  } catch (problem) {
    if (!(problem instanceof InputError)) throw problem;
    error.textContent = problem.message;
    error.hidden = false;
    return null;
  }
}

// ---- a reply: thinking block, answer, counts, sources --------------------------------------------

function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}

class ReplyView {
  // onGrow: called after each piece of text (the chat keeps the newest text in view).
  constructor(parent, { collapseOnAnswer, onGrow = () => {} }) {
    this.root = $("reply-template").content.firstElementChild.cloneNode(true);
    parent.append(this.root);
    const part = (selector) => this.root.querySelector(selector);
    this.details = part(".thinking");
    this.label = part(".thinking-label");
    this.thinkingStats = part(".thinking-stats");
    this.thinking = part(".thinking-text");
    this.answer = part(".answer");
    this.stats = part(".reply-stats");
    this.sources = part(".sources");
    this.error = part(".reply-error");
    this.collapseOnAnswer = collapseOnAnswer;
    this.onGrow = onGrow;
    this.followThinking = followBottom(this.thinking); // its own scrolled box: the newest thinking stays in view
    this.started = performance.now();
  }

  seconds() {
    return ((performance.now() - this.started) / 1000).toFixed(1);
  }

  addThinking(text) {
    if (this.root.dataset.state !== "thinking") this.root.dataset.state = "thinking";
    this.thinking.append(text);
    this.followThinking();
    this.label.textContent = `Thinking… ${this.seconds()} s`;
    this.onGrow();
  }

  addAnswer(text) {
    if (this.root.dataset.state !== "answering") {
      this.root.dataset.state = "answering";
      this.label.textContent = `Thought for ${this.seconds()} s`;
      if (this.collapseOnAnswer) this.details.open = false;
    }
    this.answer.append(text);
    this.onGrow();
  }

  finish(forcing, finishReason) {
    this.root.dataset.state = "done";
    if (!this.thinking.textContent) this.thinking.textContent = "(no thinking)";
    if (!this.answer.textContent.trim()) this.answer.classList.add("empty");
    if (!forcing) {
      this.label.textContent = "Thinking";
      this.stats.textContent = `${this.seconds()} s`;
      return;
    }
    const { thinking_tokens: thinking, answer_tokens: answer, num_ignored: waits, hit_budget: hit } = forcing;
    Object.assign(this.root.dataset, {
      thinkingTokens: thinking, answerTokens: answer, numIgnored: waits, hitBudget: hit,
    });
    this.label.textContent = `Thinking: ${plural(thinking, "token")}`;
    const badges = [
      hit ? "cut by the budget" : "ended by itself",
      `${plural(waits, "Wait")} injected`,
    ];
    this.thinkingStats.replaceChildren(...badges.map((text) => badge(text, hit && text.startsWith("cut"))));
    const cut = finishReason === "length" ? " · cut at the answer limit" : "";
    this.stats.textContent = `answer: ${plural(answer, "token")} · ${this.seconds()} s${cut}`;
  }

  setSources(sources) {
    if (!Array.isArray(sources) || sources.length === 0) return;
    const items = sources.map((source) => {
      const item = document.createElement("li");
      item.dataset.sourceId = String(source.id ?? "");
      if (Number.isInteger(source.number)) item.value = source.number;  // the [n] the answer cites
      const title = document.createElement("strong");
      title.textContent = String(source.title || source.id || "untitled");
      item.append(title);
      if (typeof source.score === "number") {
        const score = document.createElement("span");
        score.className = "score";
        score.textContent = ` ${source.score.toFixed(3)}`;
        item.append(score);
      }
      if (source.cited === true) item.append(badge("cited", false));
      const snippet = document.createElement("p");
      snippet.textContent = String(source.snippet ?? "");
      item.append(snippet);
      return item;
    });
    this.sources.querySelector(".source-list").replaceChildren(...items);
    this.sources.hidden = false;
  }

  fail(message) {
    this.root.dataset.state = "error";
    this.label.textContent = "Thinking";
    if (!this.thinking.textContent) this.details.hidden = true;
    this.error.textContent = message;
    this.error.hidden = false;
  }
}

function badge(text, warn) {
  const span = document.createElement("span");
  span.className = warn ? "badge warn" : "badge";
  span.textContent = text;
  return span;
}

function failure(problem, signal) {
  if (signal.aborted) return "Stopped.";
  return problem.message || String(problem);
}

// ---- chat --------------------------------------------------------------------------------------

async function sendChat(event) {
  event.preventDefault();
  if (chatController) return;
  const question = $("question").value.trim();
  if (!question) return;
  const settings = settingsOrShow("controls-error");
  if (!settings) return;
  $("question").value = "";

  const asked = document.createElement("li");
  asked.className = "user";
  asked.textContent = question;
  const replied = document.createElement("li");
  replied.className = "assistant";
  $("messages").append(asked, replied);
  const view = new ReplyView(replied, { collapseOnAnswer: true, onGrow: followChat });
  followChat(true);

  chatController = new AbortController();
  setRunning("chat", true);
  const turns = [...conversation, { role: "user", content: question }];
  try {
    const answer = await runReply(view, { messages: turns, ...settings }, chatController.signal);
    conversation.push({ role: "user", content: question }, { role: "assistant", content: answer });
  } catch (problem) {
    asked.classList.add("unsent");  // not part of the conversation the next question continues
    view.fail(failure(problem, chatController.signal));
  } finally {
    chatController = null;
    setRunning("chat", false);
  }
}

// Keeps a scrolled list at its bottom as it grows, unless the reader has scrolled up.
function followBottom(list) {
  let atBottom = true;
  list.addEventListener("scroll", () => {
    atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  });
  return (force = false) => {
    if (force || atBottom) list.scrollTop = list.scrollHeight;
  };
}

function newChat() {
  chatController?.abort();
  conversation.length = 0;
  $("messages").replaceChildren();
  $("question").focus();
}

// ---- compare -----------------------------------------------------------------------------------

function parseBudgets(text) {
  const budgets = text.split(",").map((part) => part.trim()).filter(Boolean).map(parseBudget);
  if (budgets.length < 2 || budgets.length > 4) {
    throw new InputError(`Give 2 to 4 thinking budgets separated by commas, not ${budgets.length}.`);
  }
  return budgets;
}

async function runCompare(event) {
  event.preventDefault();
  if (compareController) return;
  const question = $("compare-question").value.trim();
  if (!question) return;
  const error = $("compare-error");
  let budgets;
  try {
    budgets = parseBudgets($("compare-budgets").value);
    error.hidden = true;
  } catch (problem) {
    error.textContent = problem.message;
    error.hidden = false;
    return;
  }
  const settings = settingsOrShow("controls-error");
  if (!settings) return;

  const columns = $("compare-columns");
  columns.replaceChildren();
  columns.dataset.count = budgets.length;
  compareController = new AbortController();
  const signal = compareController.signal;
  setRunning("compare", true);
  // All at once: the server batches concurrent requests, each with its own budget.
  const runs = budgets.map((budget) => {
    const column = document.createElement("section");
    column.className = "column";
    column.dataset.budget = budget;
    const heading = document.createElement("h3");
    heading.className = "column-budget";
    heading.textContent = `Budget ${budget}`;
    column.append(heading);
    columns.append(column);
    const view = new ReplyView(column, { collapseOnAnswer: false });
    const body = { messages: [{ role: "user", content: question }], ...settings, max_thinking_tokens: budget };
    return runReply(view, body, signal).catch((problem) => view.fail(failure(problem, signal)));
  });
  await Promise.all(runs);
  compareController = null;
  setRunning("compare", false);
}

// ---- page --------------------------------------------------------------------------------------

function setRunning(view, running) {
  const [send, stop] = view === "chat" ? ["send", "stop"] : ["compare-send", "compare-stop"];
  $(send).disabled = running;
  $(stop).hidden = !running;
}

function showTab(name) {
  for (const tab of ["chat", "compare"]) {
    const selected = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(selected));
    $(`${tab}-view`).hidden = !selected;
  }
  if (name === "compare" && !$("compare-question").value) {
    $("compare-question").value = $("question").value;
  }
}

function showInfo() {
  $("model-name").textContent = info.model;
  document.title = `t0-s1 · ${info.model}`;
  const format = info.reasoning_format;
  $("format-name").textContent = format.name;
  $("format-start").textContent = format.thinking_start;
  $("format-end").textContent = format.thinking_end;
  $("format-name").title = (format.reasons || []).join("\n");  // why the server chose it
  const defaults = info.defaults;
  $("budget").value = String(defaults.max_thinking_tokens);
  $("num-ignore").value = defaults.num_ignore;
  defaultIgnoreString = defaults.ignore_str;
  $("ignore-str").value = defaults.ignore_str;
  $("temperature").value = defaults.temperature;
  $("max-answer").value = defaults.max_answer_tokens;
  $("key-button").hidden = !info.api_key_required;
  $("retrieval-note").hidden = !info.retrieval;
}

async function start() {
  followChat = followBottom($("messages"));
  $("chat-form").addEventListener("submit", sendChat);
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => chatController?.abort());
  $("new-chat").addEventListener("click", newChat);
  $("compare-form").addEventListener("submit", runCompare);
  $("compare-stop").addEventListener("click", () => compareController?.abort());
  $("tab-chat").addEventListener("click", () => showTab("chat"));
  $("tab-compare").addEventListener("click", () => showTab("compare"));
  $("key-form").addEventListener("submit", submitKey);
  $("key-button").addEventListener("click", () => askForKey("Enter the server's API key."));

  const response = await fetch("/ui/info");
  if (!response.ok) throw new Error(`/ui/info: ${response.status}`);
  info = await response.json();
  showInfo();
  if (info.api_key_required && !sessionStorage.getItem(KEY_STORAGE)) {
    askForKey("This server requires an API key.");
  }
  document.body.dataset.ready = "true";
}

start().catch((problem) => {
  const error = $("controls-error");
  error.textContent = `The page could not start: ${problem.message}`;
  error.hidden = false;
});
