// The start-up link is /login#code=...: a fragment never reaches the server, a proxy log
// or a Referer. Take the one-time code out of the address bar and POST it with the form
// (and its XSRF field), so the code is spent by this browser only.
(function () {
  "use strict";
  var match = /^#code=([A-Za-z0-9_-]{16,128})$/.exec(window.location.hash);
  if (!match) return;
  history.replaceState(null, "", window.location.pathname + window.location.search);
  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("login");
    document.getElementById("code").value = match[1];
    document.getElementById("token").required = false;
    form.submit();
  });
})();
