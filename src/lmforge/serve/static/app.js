// The lmforge playground: a chat that streams answers from /v1/chat/completions (server-sent events).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} of the conversation so far
let controller = null;  // aborts the running request

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
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
    }
    if (current) select.value = current;
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
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: $("model").value || undefined,
        messages: history,
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value),
        stream: true,
        stream_options: { include_usage: true },
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {
        $("status").textContent = `${chunk.usage.completion_tokens} tokens (prompt ${chunk.usage.prompt_tokens})`;
      }
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        bubble.textContent = answer;
        bubble.dataset.chunks = String(Number(bubble.dataset.chunks) + 1);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
    history.push({ role: "assistant", content: answer });
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content: answer });
      $("status").textContent = "Stopped.";
    } else {
      addMessage("error", e.message);
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
