"""The network face: an OpenAI-compatible HTTP API and a live page, on the same kernel.

As axfs.fs translates FUSE requests into kernel calls, this package translates HTTP
requests: a completion is a task made, configured and submitted as ``mkdir``, ``config``
and ``prompt`` would (named ``http-N``), its answer read from the task as ``stream`` is,
its refusals the kernel's errors as HTTP statuses. Nothing here schedules.

- ``server``: the routes, and Hypercorn serving them in the daemon's trio loop;
- ``callers``: who is asking (API keys mapped to uids);
- ``ask``: an OpenAI request's body as the tree's parameters;
- ``completions``: a request as a task, and its answer, whole or as server-sent events;
- ``answer``: the answer's JSON;
- ``status``: the kernel's errors as HTTP statuses;
- ``top``: the live page (``page.html``) and the JSON it polls.
"""
