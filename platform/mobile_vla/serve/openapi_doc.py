"""Writes the OpenAPI document of the HTTP API from the FastAPI app (docs/openapi.json).

python -m mobile_vla.serve.openapi_doc docs/openapi.json
"""

import json
import sys

from mobile_vla.serve.routes import fastapi_app


def openapi_document() -> dict:
    """The OpenAPI document of the HTTP API, with the bearer scheme on every route but the probes."""
    document = fastapi_app.openapi()
    document["components"].setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    for path, methods in document["paths"].items():
        for operation in methods.values():
            if path not in ("/healthz", "/readyz"):  # probes for load balancers: no token
                operation["security"] = [{"bearer": []}]
    return json.loads(json.dumps(document))


def main(argv: list[str]) -> int:
    """Writes the document to argv[1], else prints it."""
    text = json.dumps(openapi_document(), indent=2) + "\n"
    if len(argv) > 1:
        with open(argv[1], "w") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
