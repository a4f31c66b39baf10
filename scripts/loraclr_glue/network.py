"""The ``clora`` extra network: ``<clora:…>`` tags are ours, so the built-in Lora never loads them globally.

The WebUI strips every ``<name:…>`` tag before it builds the conditioning and calls the network named
``name`` per batch with the tag arguments of the batch's first prompt (an unmentioned network gets an
empty list: "off"). Tag positions are lost there, so the script parses the original prompt itself
(`lib_loraclr.prompt_syntax`); this network only keeps the built-in Lora away from our tags, and hands the
per-batch params to the run (`CloraRun.network_params`, for inspection).
"""

from __future__ import annotations

from typing import Any

from lib_loraclr.clora_job import LOG_PREFIX

from . import clora_run

NETWORK_NAME = "clora"


def make_network(extra_networks: Any) -> Any:
    """An instance of ``ExtraNetwork`` subclass named ``clora`` (the base class comes from the host)."""

    class CloraExtraNetwork(extra_networks.ExtraNetwork):
        def __init__(self) -> None:
            super().__init__(NETWORK_NAME)
            self.last_params: list[Any] = []

        def activate(self, p: Any, params_list: list[Any]) -> None:
            self.last_params = list(params_list)
            run = clora_run.get(p)
            if run is not None:
                run.on_network_params(params_list)
            elif params_list:
                # tags without a prepared run: the script was skipped or failed earlier (its message is
                # already in the console and the infotext); the tags stay without effect.
                names = ", ".join(str(q.items[0]).strip() for q in params_list if getattr(q, "items", None))
                print(f"{LOG_PREFIX} <clora:…> tags for {names} are ignored: CLoRA is not running")

        def deactivate(self, p: Any) -> None:
            self.last_params = []

    return CloraExtraNetwork()


def register(extra_networks: Any) -> Any:
    """Create and register the network (call from ``on_before_ui``, after the registry is initialised)."""
    net = make_network(extra_networks)
    extra_networks.register_extra_network(net)
    return net
