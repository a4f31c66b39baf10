"""``modules.scripts`` stand-in: ``AlwaysVisible``, the ``Script`` base with A1111 1.10's hooks, ``basedir``,
and the WebUI's way of loading a script file (``load_scripts_from``: every ``Script`` subclass in the
module's namespace is registered)."""

import inspect
import os
import sys

from modules import script_loading

AlwaysVisible = object()


class MaskBlendArgs:
    def __init__(self, current_latent, nmask, init_latent, mask, blended_latent, denoiser=None, sigma=None):
        self.current_latent = current_latent
        self.nmask = nmask
        self.init_latent = init_latent
        self.mask = mask
        self.blended_latent = blended_latent
        self.denoiser = denoiser
        self.is_final_blend = denoiser is None
        self.sigma = sigma


class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    controls = None
    setup_for_ui_only = False

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch_list(self, p, pp, *args, **kwargs):
        pass

    def post_sample(self, p, ps, *args):
        pass

    def postprocess_image(self, p, pp, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def on_mask_blend(self, p, mba, *args):
        pass

    def before_hr(self, p, *args):
        pass

    def elem_id(self, item_id):
        return f"script_{item_id}"


current_basedir = os.getcwd()


def basedir():
    return current_basedir


def load_scripts_from(basedir_, path):
    """Load one extension script like ``modules.scripts.load_scripts``: the extension root first on
    ``sys.path`` during the import only; returns the registered ``Script`` subclasses."""
    global current_basedir
    syspath = sys.path
    found = []
    try:
        sys.path = [basedir_, *sys.path]
        current_basedir = basedir_
        module = script_loading.load_module(path)
        for obj in module.__dict__.values():
            if inspect.isclass(obj) and issubclass(obj, Script):
                found.append(obj)
    finally:
        sys.path = syspath
        current_basedir = os.getcwd()
    return module, found
