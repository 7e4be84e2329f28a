// Fitting a chat into the model's context (pure functions, so that they can be tested outside a browser).
"use strict";

// The max tokens a reply asks for by default: `wanted`, but at most half the context, so that the first
// message has room too (a 128-token model asked for 128 new tokens refuses every prompt).
function defaultMaxTokens(maxModelLen, wanted) {
  if (!(maxModelLen > 1)) return wanted;
  return Math.max(1, Math.min(wanted, Math.floor(maxModelLen / 2)));
}

// The newest part of the conversation that fits the context with room for a reply: the oldest turns
// go first, whole (a turn starts at a user message). countTokens(messages) resolves to the prompt's
// length in tokens, as the server counts it (/tokenize). Resolves to {messages, maxTokens, dropped};
// when the newest message alone leaves less room than asked, maxTokens shrinks to what is left; when it
// leaves none, rejects with an Error that says so.
async function fitToContext(history, maxTokens, maxModelLen, countTokens) {
  let start = 0;
  for (;;) {
    const messages = history.slice(start);
    const count = await countTokens(messages);
    if (count + maxTokens <= maxModelLen) return { messages, maxTokens, dropped: start };
    let next = start + 1;
    while (next < history.length && history[next].role !== "user") next++;
    if (next >= history.length) {  // only the newest turn is left
      if (count < maxModelLen) return { messages, maxTokens: maxModelLen - count, dropped: start };
      throw new Error(`This message takes ${count} tokens with the chat template, but the model's context holds ` +
                      `${maxModelLen} in all (prompt and reply): shorten it.`);
    }
    start = next;
  }
}

// A header value that carries `text` as UTF-8: fetch sends each character of a header value as one byte
// (and refuses characters past U+00FF), so a key like "ключ" is spelled out byte by byte.
function utf8HeaderValue(text) {
  return String.fromCharCode(...new TextEncoder().encode(text));
}

if (typeof module === "object" && module.exports) module.exports = { defaultMaxTokens, fitToContext, utf8HeaderValue };
