// sipedge console: refresh every [data-poll] element from its URL every 2 s (no build step, no CDN).
// The server renders the fragment; a 401 (session ended) stops polling and reloads to the sign-in page.
(function () {
  "use strict";
  var PERIOD_MS = 2000;
  function poll(el) {
    var url = el.getAttribute("data-poll");
    var timer = setInterval(function () {
      if (document.hidden) { return; }
      fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
        .then(function (r) {
          if (r.status === 401) { clearInterval(timer); window.location.reload(); return null; }
          return r.ok ? r.text() : null;
        })
        .then(function (html) {
          if (html === null || html === undefined) { return; }
          el.innerHTML = html;  // our own server-rendered, escaped fragment
        })
        .catch(function () { /* the next tick tries again */ });
    }, PERIOD_MS);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-poll]").forEach(poll);
  });
})();
