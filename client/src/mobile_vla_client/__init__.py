"""Robot-side client of the Mobile VLA HTTP API (docs/http_api.md): sync `Client` and asyncio `AsyncClient`,
and chunk execution (`ChunkExecutor`, driven by `ChunkRunner` or `AsyncChunkRunner`).

Installs alone (httpx, numpy, Pillow; Python 3.9+), so a robot needs neither torch nor the platform.
"""

from mobile_vla_client.answers import ActResult, FeedbackResult, ModelRef, ModelSummary, Safety
from mobile_vla_client.clients import AsyncClient, Client
from mobile_vla_client.errors import ApiError, ClientError, NoAnswer
from mobile_vla_client.executor import Accepted, ChunkExecutor
from mobile_vla_client.runners import AsyncChunkRunner, ChunkRunner
from mobile_vla_client.wire import encode_jpeg, jpeg_base64

__version__ = "0.1.0"
__all__ = [
    "Accepted",
    "ActResult",
    "ApiError",
    "AsyncChunkRunner",
    "AsyncClient",
    "ChunkExecutor",
    "ChunkRunner",
    "Client",
    "ClientError",
    "FeedbackResult",
    "ModelRef",
    "ModelSummary",
    "NoAnswer",
    "Safety",
    "encode_jpeg",
    "jpeg_base64",
]
