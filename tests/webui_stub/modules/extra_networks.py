"""``modules.extra_networks`` stand-in, following A1111 1.10's behaviour: the registry, params split on
':' (``k=v`` items named), every ``<name:…>`` tag stripped from the prompt, tags taken from the first
prompt of the batch, unmentioned networks activated with an empty list."""

import re
from collections import defaultdict

extra_network_registry = {}
extra_network_aliases = {}


def initialize():
    extra_network_registry.clear()
    extra_network_aliases.clear()


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def register_extra_network_alias(extra_network, alias):
    extra_network_aliases[alias] = extra_network


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def lookup_extra_networks(extra_network_data):
    res = {}
    for name, args in list(extra_network_data.items()):
        net = extra_network_registry.get(name) or extra_network_aliases.get(name)
        if net is None:
            continue
        res.setdefault(net, []).extend(args)
    return res


def activate(p, extra_network_data):
    activated = []
    for net, args in lookup_extra_networks(extra_network_data).items():
        net.activate(p, args)
        activated.append(net)
    for net in extra_network_registry.values():
        if net not in activated:
            net.activate(p, [])


def deactivate(p, extra_network_data):
    for net in extra_network_registry.values():
        net.deactivate(p)


re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    prompt = re.sub(re_extra_net, found, prompt)
    return prompt, res


def parse_prompts(prompts):
    res = []
    extra_data = None
    for prompt in prompts:
        updated_prompt, parsed_extra_data = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed_extra_data
        res.append(updated_prompt)
    return res, extra_data
