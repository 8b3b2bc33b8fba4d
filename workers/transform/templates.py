"""Transform's templates: compiled by name from the configuration; ``pull: true`` ones re-read
from Blynk's platform API (a failed pull keeps the last datastreams)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pipeline.config import Config
from pipeline.errors import BridgeError
from pipeline.mapping import Template, datastreams_from_platform
from pipeline.provision import Platform

if TYPE_CHECKING:
    from pipeline.blynk.platform import PlatformClient
    from pipeline.routing import Route

log = logging.getLogger("blynk_bridge.transform")


class Templates:
    """Compiled templates by name; ``pull: true`` ones refreshed from the platform API."""

    def __init__(self, config: Config) -> None:
        self._configs = {t.name: t for t in config.templates}
        self.by_name: dict[str, Template] = {
            t.name: Template.from_config(t) for t in config.templates
        }
        self._untyped: dict[str, Template] = {}

    def get(self, name: str | None, fallback: str) -> Template:
        """The named template, or an untyped one (pins pass through) named ``fallback``."""
        if name is not None:
            t = self.by_name.get(name)
            if t is not None:
                return t
        t = self._untyped.get(fallback)
        if t is None:
            t = self._untyped[fallback] = Template(fallback)
        return t

    def of_route(self, r: Route) -> Template:
        """The template a routed uplink maps onto: its device's, else its integration's choice
        (transform's rule; ``blynk-bridge dry-run`` shows the same)."""
        integ = r.integration
        assert r.device is not None and integ is not None
        name: str | None = r.device.template or None
        if name is None or name not in self.by_name:
            name = integ.choose_template(r.uplink.device_meta)
        return self.get(name, f"{integ.source}:{integ.name}")

    @property
    def pulled(self) -> list[str]:
        return [n for n, t in self._configs.items() if t.pull]

    async def refresh(self, platform: Platform | PlatformClient) -> None:
        """Re-read the datastreams of every ``pull: true`` template; a failure keeps the last."""
        for name in self.pulled:
            cfg = self._configs[name]
            if not cfg.id:
                log.error("template %r has `pull: true` but no `id`", name)
                continue
            try:
                rows = await platform.template_datastreams(cfg.id)
            except BridgeError as exc:
                log.warning("pulling datastreams of template %r failed: %s", name, exc.detail)
                continue
            self.by_name[name] = Template.from_config(cfg, datastreams_from_platform(rows))
            log.info("template %r: %d datastreams pulled", name, len(rows))
