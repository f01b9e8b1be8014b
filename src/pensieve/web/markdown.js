// A small, safe markdown renderer for model output. Every piece of model text is HTML-escaped
// before any markup is added, so the model can never inject tags or attributes.
(function () {
  "use strict";

  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  // Inline markup on already-escaped text; code spans are kept apart so nothing inside changes.
  function renderInline(escaped) {
    return escaped.split(/(`[^`\n]+`)/).map(function (part, i) {
      if (i % 2 === 1) return "<code>" + part.slice(1, -1) + "</code>";
      return part
        .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
        .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
        .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
          '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
    }).join("");
  }

  function renderBlocks(text) {
    var out = [], paragraph = [], list = null;
    function flushParagraph() {
      if (paragraph.length) out.push("<p>" + paragraph.join("<br>") + "</p>");
      paragraph = [];
    }
    function flushList() {
      if (list) out.push("<" + list.tag + ">" + list.items.join("") + "</" + list.tag + ">");
      list = null;
    }
    text.split("\n").forEach(function (raw) {
      var line = escapeHtml(raw), m;
      if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) {
        flushParagraph(); flushList();
        out.push("<h" + m[1].length + ">" + renderInline(m[2]) + "</h" + m[1].length + ">");
      } else if ((m = /^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/.exec(line))) {
        flushParagraph();
        var tag = m[1] ? "ol" : "ul";
        if (list && list.tag !== tag) flushList();
        if (!list) list = { tag: tag, items: [] };
        list.items.push("<li>" + renderInline(m[2]) + "</li>");
      } else if (line.trim() === "") {
        flushParagraph(); flushList();
      } else {
        flushList();
        paragraph.push(renderInline(line));
      }
    });
    flushParagraph(); flushList();
    return out.join("");
  }

  // Fenced code blocks first; an unterminated fence (mid-stream) runs to the end of the text.
  function renderMarkdown(text) {
    var html = [], fence = /```([\w+.#-]*)[^\n]*\n?([\s\S]*?)(?:\n?```|$)/g, last = 0, m;
    while ((m = fence.exec(text)) !== null) {
      html.push(renderBlocks(text.slice(last, m.index)));
      var lang = m[1] ? ' class="language-' + escapeHtml(m[1]) + '"' : "";
      html.push("<pre><code" + lang + ">" + escapeHtml(m[2]) + "</code></pre>");
      last = fence.lastIndex;
      if (m[0].length === 0) break;
    }
    html.push(renderBlocks(text.slice(last)));
    return html.join("");
  }

  window.PensieveMarkdown = { render: renderMarkdown, escapeHtml: escapeHtml };
})();
