"""Starting the server: check the model folder is there (the model itself loads on the first job),
set up logging without uvicorn's access log (ours leaves query strings out), then run uvicorn."""

from __future__ import annotations

import logging
import os

from neurovfm.serve.settings import TOKEN_ENV, ServeConfigError, ServeSettings


def resolve_model(model: str | None) -> str:
    if model is None:
        from neurovfm.analyze.pipeline import default_model_path

        model = default_model_path()
    model = os.path.abspath(model)
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ServeConfigError(f"{model}: no model here (no config.json); pass --model MODEL_FOLDER")
    return model


def token_from(arg: str | None) -> str | None:
    return arg or os.environ.get(TOKEN_ENV) or None


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(settings: ServeSettings) -> None:
    import uvicorn

    from neurovfm.serve.app import create_app

    settings.model = resolve_model(settings.model)
    configure_logging()
    app = create_app(settings)
    where = f"http://{'[' + settings.host + ']' if ':' in settings.host else settings.host}:{settings.port}/"
    print(f"neurovfm serve: {where}  (research use only, not a medical device)", flush=True)
    if settings.token_required:
        print("a token is required: open the page and log in with it (or send Authorization: Bearer TOKEN)",
              flush=True)
    print(f"outputs under {settings.data}, kept {settings.retention_hours:g} h", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_config=None,
                server_header=False, proxy_headers=False, timeout_graceful_shutdown=5)
