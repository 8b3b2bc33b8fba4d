"""What the stages of one process share: configuration, one Redis client, one Blynk client."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.config import Config
from pipeline.keys import Keys
from pipeline.streams import Redis, StreamWriter, connect

if TYPE_CHECKING:
    from pipeline.blynk.client import BlynkClient


@dataclass
class Context:
    config: Config
    redis: Redis
    keys: Keys
    consumer: str
    writer: StreamWriter
    _blynk: BlynkClient | None = field(default=None, repr=False)

    @classmethod
    def create(cls, config: Config, *, consumer: str | None = None) -> Context:
        redis = connect(config.redis.url, cluster=config.redis.is_cluster)
        keys = config.redis.keys()
        name = consumer or config.streams.consumer or f"{socket.gethostname()}-{os.getpid()}"
        return cls(config=config, redis=redis, keys=keys, consumer=name,
                   writer=StreamWriter(redis))

    def blynk(self) -> BlynkClient:
        """The process's one Blynk client (one aiohttp session, one connection pool)."""
        if self._blynk is None:
            from pipeline.blynk.client import BlynkClient

            self._blynk = BlynkClient(self.config.blynk, self.redis, self.keys)
        return self._blynk

    async def close(self) -> None:
        await self.writer.close()
        if self._blynk is not None:
            await self._blynk.close()
        await self.redis.aclose()
