// The lmforge playground: a chat that streams answers from /v1/chat/completions (server-sent events).
// Each request is fitted into the model's context (max_model_len from /v1/models): the oldest turns are
// left out, and the reply's max tokens shrink to the room that is left (context.js).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} of the conversation so far
const contextOf = {};  // model id -> max_model_len, from /v1/models
let controller = null;  // aborts the running request

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + utf8HeaderValue(key);
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  div.dataset.chunks = "0";
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    const select = $("model");
    const current = select.value;
    select.innerHTML = "";
    for (const m of (await response.json()).data) {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      select.appendChild(option);
      contextOf[m.id] = m.max_model_len;
    }
    if (current) select.value = current;
    const context = contextOf[select.value];
    if (context > 1) {
      $("max-tokens").max = String(context - 1);
      $("max-tokens").value = String(defaultMaxTokens(context, Number($("max-tokens").value) || 1));
    }
    $("status").textContent = "";
  } catch (e) {
    $("status").textContent = "Could not list models: " + e.message;
  }
}

// Read an SSE stream: yields the parsed JSON of each "data:" event until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// The prompt's length in tokens as the server counts it (its chat template included).
async function countTokens(messages) {
  const response = await fetch("/tokenize", {
    method: "POST",
    headers: headers(),
    signal: controller && controller.signal,
    body: JSON.stringify({ model: $("model").value || undefined, messages }),
  });
  if (!response.ok) throw new Error(await errorText(response));
  return (await response.json()).count;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "Generating…";
  let answer = "";
  let finish = null;
  let note = "";
  try {
    const context = contextOf[$("model").value];
    let messages = history;
    let maxTokens = Math.max(1, Number($("max-tokens").value) || 1);
    if (context > 1) {
      const fit = await fitToContext(history, maxTokens, context, countTokens);
      ({ messages, maxTokens } = fit);
      if (fit.dropped) note = ` · left out the ${fit.dropped} oldest messages to fit the ${context}-token context`;
    }
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: $("model").value || undefined,
        messages,
        temperature: Number($("temperature").value),
        max_tokens: maxTokens,
        stream: true,
        stream_options: { include_usage: true },
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    if (note) $("status").textContent = "Generating…" + note;
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {
        $("status").textContent = `${chunk.usage.completion_tokens} tokens (prompt ${chunk.usage.prompt_tokens})` + note;
      }
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (choice && choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        bubble.textContent = answer;
        bubble.dataset.chunks = String(Number(bubble.dataset.chunks) + 1);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
    if (!answer) {  // say so, rather than leave an empty bubble
      bubble.textContent = `(no text: the model ended its reply at once; finish reason: ${finish || "none"})`;
      bubble.classList.add("empty");
    }
    history.push({ role: "assistant", content: answer });
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content: answer });
      $("status").textContent = "Stopped.";
    } else {  // the server's message, in the reply's own bubble
      bubble.className = "message error";
      bubble.textContent = e.message || String(e);
      $("status").textContent = "";
      history.pop();
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "true";
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").innerHTML = "";
  $("status").textContent = "";
});
$("api-key").addEventListener("change", loadModels);
loadModels();
