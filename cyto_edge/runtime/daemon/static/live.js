// The live page: polls /api/status once a second, starts and stops slide sessions through the API.
(function () {
  const $ = (id) => document.getElementById(id);
  const fmt = (s) => { s = Math.floor(s || 0); return `${Math.floor(s / 3600)}:${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`; };
  function show(st) {
    $("cam-state").textContent = st.camera.state + (st.camera.state === "lost" ? " — reconnecting" : "");
    $("cam-state").className = "cam-" + st.camera.state;
    $("cam-badge").textContent = "camera " + st.camera.state; $("cam-badge").className = "badge cam-" + st.camera.state;
    $("eng-state").textContent = st.engine.state + (st.engine.error ? ": " + st.engine.error : "");
    $("eng-badge").textContent = "engine " + st.engine.state; $("eng-badge").className = "badge eng-" + st.engine.state;
    $("fps").textContent = st.live.fps;
    $("latency").textContent = ((st.live.latency_ms || {}).p95 ?? "-") + " ms";
    $("graded").textContent = st.live.fovs_graded; $("dropped").textContent = st.live.frames_dropped;
    if (st.tracker) { $("stage").textContent = st.tracker.state; $("focus").value = st.tracker.relative_focus; }
    if (st.last_fov) {
      $("last-grade").textContent = st.last_fov.grade;
      $("last-grade").className = "g-" + st.last_fov.grade.toLowerCase().replace("-", "");
      $("last-susp").textContent = st.last_fov.suspicion.toFixed(2);
    }
    const s = st.session;
    $("session-open").hidden = !s; $("start-form").hidden = !!s;
    if (s) {
      $("sess-slide").textContent = s.slide_id; $("sess-time").textContent = fmt(s.active_s);
      $("sess-link").href = "/sessions/" + s.id; $("sess-gallery").href = "/sessions/" + s.id + "/gallery";
      $("stop-btn").dataset.sid = s.id;
    }
  }
  async function poll() {
    try { const r = await fetch("/api/status", {credentials: "same-origin"}); if (r.ok) show(await r.json()); } catch (e) { /* next tick */ }
  }
  async function call(url, body) {
    const r = await fetch(url, {method: "POST", credentials: "same-origin", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body || {})});
    if (!r.ok) { const d = await r.json().catch(() => ({})); $("msg").textContent = typeof d.detail === "string" ? d.detail : "refused (" + r.status + ")"; }
    else { $("msg").textContent = ""; }
    poll();
  }
  $("start-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    call("/api/sessions", {slide_id: f.get("slide_id"), operator: f.get("operator") || "", notes: f.get("notes") || ""});
  });
  $("stop-btn").addEventListener("click", (e) => call("/api/sessions/" + e.target.dataset.sid + "/stop"));
  setInterval(poll, 1000); poll();
})();
