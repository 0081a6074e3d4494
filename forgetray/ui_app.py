"""MLflow's own server app with one change, for `forgetray ui`: its page opens every experiment in the Model
training mode (runs table, charts) instead of GenAI, also where a link does not say so.

Why: MLflow 3.17's UI takes its mode from the link's `workflowType` parameter, else from the browser's last choice
(localStorage `mlflow.workflowType_v1`), else GenAI. The runs table links a run's page without the parameter, so
a run clicked in forgetray's view opened in GenAI mode. The page served here first stores Model training as the
browser's choice when it has made none (a choice made in the UI's switch stays).

`python -m forgetray.ui_app ARGS` runs `mlflow server ARGS` with this app (as if installed as an `mlflow.app`
plugin named forgetray); uvicorn imports `forgetray.ui_app:app`.
"""

from __future__ import annotations

import sys

WORKFLOW_KEY = "mlflow.workflowType_v1"  # the UI's useLocalStorage key ("mlflow.workflowType", version 1)
SCRIPT = (b'<script>try{if(localStorage.getItem("' + WORKFLOW_KEY.encode() + b'")===null)localStorage.setItem("'
          + WORKFLOW_KEY.encode() + b'",JSON.stringify("machine_learning"))}catch(e){}</script>')
APP = "forgetray.ui_app:app"


class _ModelTrainingFirst:
    """ASGI: MLflow's FastAPI app; its HTML page gets `SCRIPT` first in <head> (before the UI's own scripts run).
    A class, not a function: MLflow runs an `mlflow.app` function as a factory."""

    def __init__(self):
        self.inner = None

    async def __call__(self, scope, receive, send):
        if self.inner is None:
            from mlflow.server.fastapi_app import app as inner

            self.inner = inner
        if scope["type"] != "http" or scope.get("method") != "GET":
            return await self.inner(scope, receive, send)
        start: dict = {}
        body = []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
                headers = dict(message.get("headers") or [])
                if not headers.get(b"content-type", b"").startswith(b"text/html"):
                    start["pass"] = True
                    await send(message)
            elif start.get("pass"):
                await send(message)
            else:
                body.append(message.get("body", b""))
                if not message.get("more_body"):
                    html = b"".join(body).replace(b"<head>", b"<head>" + SCRIPT, 1)
                    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                    await send({**{k: v for k, v in start.items() if k != "pass"},
                                "headers": headers + [(b"content-length", str(len(html)).encode())]})
                    await send({"type": "http.response.body", "body": html})

        await self.inner(scope, receive, capture)


app = _ModelTrainingFirst()


def main(argv: list[str]) -> None:
    """`mlflow server ARGV --app-name forgetray`: MLflow's CLI with this module's app as a plugin app."""
    from importlib.metadata import EntryPoint

    import mlflow.utils.plugins as plugins

    found = plugins.get_entry_points
    ours = EntryPoint(name="forgetray", value=APP, group="mlflow.app")
    # Before MLflow's CLI and server modules import it: they list the apps `--app-name` may name from it.
    plugins.get_entry_points = lambda group: [*found(group), *([ours] if group == "mlflow.app" else [])]
    for module in ("mlflow.server", "mlflow.cli"):
        if module in sys.modules:
            sys.modules[module].get_entry_points = plugins.get_entry_points
    from mlflow.cli import cli

    cli.main(["server", *argv, "--app-name", "forgetray"], prog_name="mlflow")


if __name__ == "__main__":
    main(sys.argv[1:])
