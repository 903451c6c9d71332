"""`cyto-edge serve`: the on-device screening service.

    store.py      SQLite (WAL) results store: schema and migrations, sessions, one transaction per FOV, lock
    images.py     FOV JPEGs and cell crops, written and fsynced before their rows; path validation
    retention.py  retention in days and the disk budget: oldest images first, never results
    recorder.py   one graded FOV -> images + rows; disk-full alerts
    queries.py    the read side: sessions, FOVs, slide summary, gallery, CSV/JSON exports
    service.py    camera + LiveRunner + sessions + bundle swaps; camera / engine states
    live_view.py  the newest overlay for the MJPEG stream; focus bar; status frames
    web.py        FastAPI app: pages, MJPEG, /healthz, /metrics; api.py the JSON API; auth.py the token
    metrics.py    Prometheus text format; logs.py structured logs; sdnotify.py systemd notifications
    server.py     the process: start-up order, signals, watchdog, graceful stop
"""
