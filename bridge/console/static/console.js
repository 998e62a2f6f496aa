/* postback-bridge console: the little the pages do in the browser. Without it they work, with
   times in UTC. With it: times in the viewer's time zone, and a region that updates itself
   (htmx polling) waits while the viewer is working in it (focus inside, boxes ticked) and while
   the tab is hidden. */
(function () {
  "use strict";
  var format = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric",
    hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short"
  });

  function localize(root) {
    var times = root.querySelectorAll ? root.querySelectorAll("time[datetime]") : [];
    for (var i = 0; i < times.length; i++) {
      var t = times[i];
      var moment = new Date(t.getAttribute("datetime"));
      if (!isNaN(moment.getTime()) && !t.hasAttribute("data-local")) {
        t.setAttribute("title", t.textContent);
        t.textContent = format.format(moment);
        t.setAttribute("data-local", "");
      }
    }
  }

  document.addEventListener("DOMContentLoaded", function () { localize(document); });
  document.addEventListener("htmx:load", function (e) { localize(e.detail.elt); });
  document.addEventListener("htmx:beforeRequest", function (e) {
    var region = e.detail.elt;
    if (!region.hasAttribute || !region.hasAttribute("data-live")) { return; }
    var busy = region.contains(document.activeElement) && document.activeElement !== document.body;
    // a tab in the background asks nothing: it catches up on the first poll once shown again
    if (busy || document.hidden || region.querySelector("input[type=checkbox]:checked")) { e.preventDefault(); }
  });
})();
