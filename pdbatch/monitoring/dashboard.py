"""The pdbatch page on the Dask dashboard: served from the scheduler's dashboard by the monitor
when it starts (pdbatch.monitoring.monitor; the scheduler preload `pdbatch.dashboard` starts
the monitor before the first job, or the driver does at job start)."""

from __future__ import annotations

import functools
import logging

PAGE = "/pdbatch"
log = logging.getLogger("pdbatch.monitor")


def page_url(dashboard_link: str | None) -> str | None:
    """The pdbatch page next to a dashboard link such as http://host:8787/status."""
    if not dashboard_link:
        return None
    return dashboard_link.rsplit("/", 1)[0] + PAGE


def add_page(scheduler, monitor) -> bool:
    """Serve the pdbatch page from the scheduler's dashboard (once; False if there is none)."""
    if getattr(scheduler, "_pdbatch_page", None) is not None:
        return True
    try:
        from bokeh.server.server import BokehTornado
        from distributed.dashboard.core import BokehApplication
        from distributed.dashboard.scheduler import template_variables
        from tornado.ioloop import IOLoop

        from .dashboard_page import pdbatch_doc
    except ImportError as e:  # no bokeh: Dask runs without a dashboard too
        log.info("no pdbatch dashboard page: %s", e)
        return False
    http = getattr(scheduler, "http_application", None)
    dask_apps = [a for a in getattr(http, "applications", ()) if isinstance(a, BokehTornado)]
    if not dask_apps:  # the scheduler was started with its dashboard off
        return False
    variables = template_variables(scheduler)  # shared by every dashboard page: add a nav link
    if PAGE.strip("/") not in variables["pages"]:
        variables["pages"].append(PAGE.strip("/"))
    app = BokehApplication({PAGE: functools.partial(pdbatch_doc, monitor)}, scheduler,
                           prefix=dask_apps[0].prefix, template_variables=variables)
    http.add_application(app)
    app.initialize(IOLoop.current())
    app.start()
    scheduler._pdbatch_page = app
    return True
