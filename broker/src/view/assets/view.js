// carerecord view: fills the record page as organisations answer (server-sent events), then
// shows the merged record. Every fragment is HTML the server rendered and escaped; this script
// only places it. Without scripts the page falls back to /record-complete by itself.
(function () {
  "use strict";
  var record = document.getElementById("record");
  if (!record) {
    return;
  }
  if (!window.EventSource) {
    window.location.replace("record-complete");
    return;
  }
  var announcer = document.createElement("div");
  announcer.className = "visually-hidden";
  announcer.setAttribute("role", "status");
  announcer.setAttribute("aria-live", "polite");
  document.body.appendChild(announcer);

  var events = new EventSource("record-events");
  var finished = false;

  function fragment(html) {
    var template = document.createElement("template");
    template.innerHTML = html;
    return template.content;
  }

  events.addEventListener("source", function (e) {
    var data = JSON.parse(e.data);
    var orgs = document.getElementById("org-list");
    if (orgs) {
      orgs.appendChild(fragment(data.organisation));
    }
    Object.keys(data.sections).forEach(function (key) {
      var list = document.getElementById("arrivals-" + key);
      if (!list) {
        return;
      }
      list.appendChild(fragment(data.sections[key]));
      var status = list.parentNode.querySelector(".section__status");
      if (status) {
        status.textContent = "Entries so far, as each organisation sent them (not yet merged):";
      }
    });
  });

  function finish(e, whole) {
    finished = true;
    events.close();
    var data = JSON.parse(e.data);
    var current = document.getElementById("record");
    if (whole) {
      current.replaceWith(fragment(data.html));
      announcer.textContent = "The record is complete.";
    } else {
      current.setAttribute("aria-busy", "false");
      current.replaceChildren(fragment(data.html));
      announcer.textContent = "The record cannot be shown.";
    }
  }

  events.addEventListener("complete", function (e) {
    finish(e, true);
  });
  events.addEventListener("refused", function (e) {
    finish(e, false);
  });
  events.addEventListener("error", function () {
    if (finished) {
      return;
    }
    // No second lookup behind the clinician's back: show the page that waits for the answer.
    finished = true;
    events.close();
    window.location.replace("record-complete");
  });
})();
