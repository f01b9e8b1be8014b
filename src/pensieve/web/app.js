// Pensieve's browser chat: streams answers from /v1/chat/completions, keeps conversations in
// localStorage. No framework, no build step, no network access beyond this server.
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var STORE = "pensieve.conversations", CURRENT = "pensieve.current", SETTINGS = "pensieve.settings";
  var state = { conversations: load(STORE, []), currentId: localStorage.getItem(CURRENT),
                controller: null };

  function load(key, fallback) {
    try { return JSON.parse(localStorage.getItem(key)) || fallback; } catch (e) { return fallback; }
  }
  function save() {
    localStorage.setItem(STORE, JSON.stringify(state.conversations));
    if (state.currentId) localStorage.setItem(CURRENT, state.currentId);
  }
  function current() {
    return state.conversations.find(function (c) { return c.id === state.currentId; });
  }
  function newConversation() {
    var conv = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6),
                 title: "New chat", model: $("model").value, messages: [] };
    state.conversations.unshift(conv);
    state.currentId = conv.id;
    save(); renderAll();
    return conv;
  }

  // --- settings ---------------------------------------------------------------------------
  var SETTING_FIELDS = { system: "system", temperature: "temperature", maxTokens: "max-tokens",
                         extra: "extra", apiKey: "api-key" };
  function restoreSettings() {
    var saved = load(SETTINGS, {});
    Object.keys(SETTING_FIELDS).forEach(function (k) {
      var el = $(SETTING_FIELDS[k]);
      if (saved[k] !== undefined) el.value = saved[k];
      el.addEventListener("change", saveSettings);
    });
  }
  function saveSettings() {
    var values = {};
    Object.keys(SETTING_FIELDS).forEach(function (k) { values[k] = $(SETTING_FIELDS[k]).value; });
    localStorage.setItem(SETTINGS, JSON.stringify(values));
  }
  function headers() {
    var h = { "Content-Type": "application/json" }, key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // --- rendering --------------------------------------------------------------------------
  function renderConversations() {
    var list = $("conversations");
    list.textContent = "";
    state.conversations.forEach(function (conv) {
      var li = document.createElement("li"), title = document.createElement("span");
      var del = document.createElement("button");
      li.className = conv.id === state.currentId ? "active" : "";
      li.dataset.id = conv.id;
      title.className = "title"; title.textContent = conv.title;
      title.addEventListener("click", function () { select(conv.id); });
      del.className = "delete"; del.type = "button"; del.textContent = "\u00d7";
      del.setAttribute("aria-label", "Delete conversation");
      del.addEventListener("click", function () { remove(conv.id); });
      li.append(title, del); list.append(li);
    });
  }
  function messageElement(msg) {
    var el = document.createElement("div");
    el.className = "message " + msg.role;
    fillMessage(el, msg);
    return el;
  }
  function fillMessage(el, msg) {
    if (msg.role === "assistant") el.innerHTML = PensieveMarkdown.render(msg.content);
    else el.textContent = msg.content;
    if (msg.meta) {
      var meta = document.createElement("div");
      meta.className = "meta"; meta.textContent = msg.meta;
      el.append(meta);
    }
  }
  function renderMessages() {
    var box = $("messages"), conv = current();
    box.textContent = "";
    if (conv) conv.messages.forEach(function (m) { box.append(messageElement(m)); });
    box.scrollTop = box.scrollHeight;
  }
  function renderAll() {
    var conv = current();
    if (conv && conv.model && hasModel(conv.model)) $("model").value = conv.model;
    renderConversations(); renderMessages();
  }
  function hasModel(name) {
    return Array.prototype.some.call($("model").options, function (o) { return o.value === name; });
  }
  function select(id) {
    state.currentId = id; save(); renderAll();
    $("layout").classList.remove("show-sidebar");
  }
  function remove(id) {
    state.conversations = state.conversations.filter(function (c) { return c.id !== id; });
    if (state.currentId === id) state.currentId = state.conversations.length
      ? state.conversations[0].id : null;
    if (!state.currentId) localStorage.removeItem(CURRENT);
    save(); renderAll();
  }
  function setStatus(text) { $("status").textContent = text; }

  // --- models -----------------------------------------------------------------------------
  function loadModels() {
    return fetch("/v1/models", { headers: headers() }).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok) throw new Error(errorText(body, r.status));
        var select = $("model");
        select.textContent = "";
        body.data.forEach(function (m) {
          var opt = document.createElement("option");
          opt.value = m.id; opt.textContent = m.id; select.append(opt);
        });
        setStatus(body.data.length ? "" : "no models served");
        renderAll();
      });
    }).catch(function (e) { setStatus("Cannot list models: " + e.message); });
  }

  // --- sending and streaming --------------------------------------------------------------
  function errorText(body, status) {
    var err = body && body.error;
    var msg = typeof err === "string" ? err : err && err.message;
    if (status === 401) return (msg || "unauthorized") + " (set the API key under Settings)";
    return msg || "HTTP " + status;
  }
  function requestBody(conv) {
    var messages = [], system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    conv.messages.forEach(function (m) {
      if (m.role === "user" || m.role === "assistant") {
        messages.push({ role: m.role, content: m.content });
      }
    });
    var body = { model: conv.model, messages: messages, stream: true,
                 stream_options: { include_usage: true } };
    // An empty temperature sends none, so the model's own sampling defaults apply (the embedded
    // model's were chosen by measurement: bench/loops.py).
    var temperature = parseFloat($("temperature").value), maxTokens = parseInt($("max-tokens").value, 10);
    if (!isNaN(temperature)) body.temperature = temperature;
    if (!isNaN(maxTokens)) body.max_tokens = maxTokens;
    var extra = $("extra").value.trim();
    if (extra) Object.assign(body, JSON.parse(extra));
    return body;
  }
  function statsLine(usage, seconds) {
    var parts = [usage.completion_tokens + " tokens"];
    if (seconds > 0) parts.push((usage.completion_tokens / seconds).toFixed(1) + " tok/s");
    var cached = (usage.prompt_tokens_details || {}).cached_tokens || 0;
    parts.push(cached + " of " + usage.prompt_tokens + " prompt tokens cached");
    return parts.join(" \u00b7 ");
  }

  function send(text) {
    var conv = current() || newConversation();
    conv.model = $("model").value;
    conv.messages.push({ role: "user", content: text });
    if (conv.title === "New chat") conv.title = text.slice(0, 40);
    var answer = { role: "assistant", content: "" }, body;
    try { body = requestBody(conv); } catch (e) {
      conv.messages.pop(); setStatus("Extra request JSON is not valid JSON: " + e.message);
      return;
    }
    conv.messages.push(answer);
    save(); renderConversations(); renderMessages();
    var el = $("messages").lastChild;
    el.dataset.chunks = "0"; el.dataset.state = "streaming";
    stream(body, answer, el).finally(function () {
      save(); renderConversations(); setBusy(false);
    });
  }

  function stream(body, answer, el) {
    var controller = new AbortController(), started = performance.now(), first = null;
    var usage = null, chunks = 0;
    state.controller = controller; setBusy(true);
    function onEvent(data) {
      if (data === "[DONE]") return;
      var chunk = JSON.parse(data);
      if (chunk.error) throw new Error(errorText(chunk, 500));
      if (chunk.model) el.dataset.model = chunk.model;
      if (chunk.usage) usage = chunk.usage;
      var delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        answer.content += delta.content; chunks += 1;
        el.dataset.chunks = String(chunks);
        fillMessage(el, answer);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
    return fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                            body: JSON.stringify(body), signal: controller.signal })
      .then(function (r) {
        if (!r.ok) return r.json().catch(function () { return null; })
          .then(function (b) { throw new Error(errorText(b, r.status)); });
        return readEvents(r.body.getReader(), onEvent);
      })
      .then(function () {
        var seconds = (performance.now() - (first || started)) / 1000;
        answer.meta = usage ? statsLine(usage, seconds) : "";
        $("stats").textContent = answer.meta;
        el.dataset.state = "done";
      })
      .catch(function (e) {
        if (e.name === "AbortError") {
          answer.meta = "stopped after " + chunks + " chunks";
          el.dataset.state = "stopped";
        } else {
          answer.meta = "Error: " + e.message;
          el.classList.add("error"); el.dataset.state = "error";
        }
        $("stats").textContent = answer.meta;
      })
      .finally(function () { fillMessage(el, answer); state.controller = null; });
  }

  function readEvents(reader, onEvent) {
    var decoder = new TextDecoder(), buffer = "";
    function pump() {
      return reader.read().then(function (result) {
        buffer += decoder.decode(result.value || new Uint8Array(), { stream: !result.done });
        var events = buffer.split("\n\n");
        buffer = result.done ? "" : events.pop();
        events.forEach(function (ev) {
          ev.split("\n").forEach(function (line) {
            if (line.indexOf("data:") === 0) onEvent(line.slice(5).trim());
          });
        });
        return result.done ? undefined : pump();
      });
    }
    return pump();
  }

  function setBusy(busy) {
    $("send").hidden = busy; $("stop").hidden = !busy;
    $("prompt").disabled = false;
  }

  // --- wiring -----------------------------------------------------------------------------
  $("composer").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var text = $("prompt").value.trim();
    if (!text || state.controller) return;
    if (!$("model").value) { setStatus("No model to talk to: is the server serving one?"); return; }
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault(); $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", function () {
    if (state.controller) state.controller.abort();
  });
  $("new-chat").addEventListener("click", function () {
    newConversation(); $("layout").classList.remove("show-sidebar"); $("prompt").focus();
  });
  $("model").addEventListener("change", function () {
    var conv = current();
    if (conv) { conv.model = $("model").value; save(); }
  });
  $("toggle-sidebar").addEventListener("click", function () {
    $("layout").classList.toggle("show-sidebar");
  });
  $("api-key").addEventListener("change", loadModels);

  restoreSettings();
  loadModels();
})();
