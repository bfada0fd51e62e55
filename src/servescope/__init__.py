"""servescope: launch, supervise and talk to LLM inference servers.

One ``async with open_server(config) as server`` holds a server's whole life — its
process tree, log scanners, readiness probe and requests — under asyncio or trio;
``async with open_pool(config, replicas=4) as pool`` holds many, routed among;
``async with open_front(pool, FrontConfig(port=8000))`` serves them to any OpenAI client;
``VLLMConfig(..., nodes=NodesConfig())`` serves one model across nodes (one scope per node).
"""

from ._config import ServerConfig as ServerConfig
from ._errors import BadRequest as BadRequest
from ._errors import ConfigError as ConfigError
from ._errors import ControlError as ControlError
from ._errors import NotHeadNode as NotHeadNode
from ._errors import PoolFailed as PoolFailed
from ._errors import RequestError as RequestError
from ._errors import RequestTimeout as RequestTimeout
from ._errors import RetriesExhausted as RetriesExhausted
from ._errors import ServeError as ServeError
from ._errors import ServerClosed as ServerClosed
from ._errors import ServerCrashed as ServerCrashed
from ._errors import ServerError as ServerError
from ._errors import ServerStartError as ServerStartError
from ._errors import StreamInterrupted as StreamInterrupted
from ._front import Front as Front
from ._front import open_front as open_front
from ._frontconfig import FrontConfig as FrontConfig
from ._loadconfig import load_config as load_config
from ._loadconfig import load_pool_config as load_pool_config
from ._metrics import MetricsSnapshot as MetricsSnapshot
from ._nodes import NodeRole as NodeRole
from ._nodes import NodesConfig as NodesConfig
from ._pool import Pool as Pool
from ._pool import open_pool as open_pool
from ._poolconfig import PoolConfig as PoolConfig
from ._replica import ReplicaInfo as ReplicaInfo
from ._responses import Chunk as Chunk
from ._responses import Completion as Completion
from ._responses import Usage as Usage
from ._server import Server as Server
from ._server import WorkerNode as WorkerNode
from ._server import open_server as open_server
from .backends.custom import CustomConfig as CustomConfig
from .backends.dummy import DummyConfig as DummyConfig
from .backends.endpoint import EndpointConfig as EndpointConfig
from .backends.sglang import SGLangConfig as SGLangConfig
from .backends.vllm import VLLMConfig as VLLMConfig

__version__ = "0.1.0"
