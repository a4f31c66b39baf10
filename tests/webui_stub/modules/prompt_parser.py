"""``modules.prompt_parser`` stand-in: the conditioning containers and reconstruct functions with
A1111 1.10's semantics. Simplification: no prompt-editing schedules (one schedule entry per prompt,
valid until the last step); ``AND`` splits into weighted sub-prompts as in the WebUI."""

import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])

re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res = []
    for prompt in prompts:
        cond = model.get_learned_conditioning([prompt])
        cond = {k: v[0] for k, v in cond.items()} if isinstance(cond, dict) else cond[0]
        res.append([ScheduledPromptConditioning(steps, cond)])
    return res


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    batch = []
    for prompt in prompts:
        parts = []
        for sub in re_AND.split(prompt):
            m = re_weight.search(sub)
            text, weight = (m.group(1), float(m.group(2))) if m and m.group(2) is not None else (sub, 1.0)
            parts.append(
                ComposableScheduledPromptConditioning(
                    get_learned_conditioning(model, [text], steps)[0], weight
                )
            )
        batch.append(parts)
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def _pick(schedule, current_step):
    for entry in schedule:
        if current_step <= entry.end_at_step:
            return entry
    return schedule[0]


def reconstruct_cond_batch(c, current_step):
    conds = [_pick(s, current_step).cond for s in c]
    if isinstance(conds[0], dict):
        return DictWithShape({k: torch.stack([x[k] for x in conds]) for k in conds[0]})
    return torch.stack(conds)


def reconstruct_multicond_batch(c, current_step):
    tensors = []
    conds_list = []
    for composable_prompts in c.batch:
        conds_for_batch = []
        for cp in composable_prompts:
            conds_for_batch.append((len(tensors), cp.weight))
            tensors.append(_pick(cp.schedules, current_step).cond)
        conds_list.append(conds_for_batch)
    if isinstance(tensors[0], dict):
        return conds_list, DictWithShape({k: torch.stack([x[k] for x in tensors]) for k in tensors[0]})
    n = max(t.shape[0] for t in tensors)
    tensors = [t if t.shape[0] == n else torch.cat([t, t[-1:].repeat(n - t.shape[0], 1)]) for t in tensors]
    return conds_list, torch.stack(tensors)
