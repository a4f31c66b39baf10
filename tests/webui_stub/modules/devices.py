"""``modules.devices`` stand-in: CPU, no autocast."""

import contextlib

import torch

device = torch.device("cpu")
dtype = torch.float32


def autocast(disable=False):
    return contextlib.nullcontext()


def torch_gc():
    pass
