"""``modules.processing`` stand-in: ``StableDiffusionProcessing`` with the attributes the glue reads, and a
``process_images`` that calls script hooks and extra networks in A1111 1.10's order:

process → per batch [before_process_batch → parse tags (all ``<name:…>`` stripped, tags of the
first prompt) → extra_networks.activate → process_batch → conds (cached, class-wide cache) →
sampler created → process_before_every_sampling → k-diffusion Euler through the CFG denoiser →
postprocess_batch] → postprocess. Exceptions propagate (``postprocess`` is then not called, as in A1111).
"""

import torch

from modules import extra_networks, prompt_parser, script_callbacks, sd_samplers_common, shared


class Processed:
    def __init__(self, p, images, infotexts):
        self.images = images
        self.infotexts = infotexts
        self.extra_generation_params = dict(p.extra_generation_params)


class StableDiffusionProcessing:
    cached_uc = [None, None]  # noqa: RUF012 - class-wide on purpose, as in A1111
    cached_c = [None, None]  # noqa: RUF012

    def __init__(
        self,
        sd_model=None,
        prompt="",
        negative_prompt="",
        seed=1,
        batch_size=1,
        n_iter=1,
        steps=4,
        cfg_scale=5.0,
        width=64,
        height=64,
        outpath_samples=None,
        scripts=None,
        script_args=None,
        outpath_grids=None,
        sampler_name=None,
        do_not_save_samples=False,
        do_not_save_grid=False,
        override_settings=None,
        scheduler=None,
    ):
        # keyword names as A1111 1.10's dataclass fields (the glue passes everything by keyword)
        self.sd_model = sd_model
        self.outpath_grids = outpath_grids
        self.sampler_name = sampler_name
        self.scheduler = scheduler  # A1111 >= 1.9 and Forge
        self.do_not_save_samples = do_not_save_samples
        self.do_not_save_grid = do_not_save_grid
        self.override_settings = override_settings or {}
        self.closed = False
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.steps = steps
        self.cfg_scale = cfg_scale
        self.width = width
        self.height = height
        self.outpath_samples = outpath_samples
        self.extra_generation_params = {}
        self.scripts = scripts
        self.script_args = script_args or []
        self.sampler = None
        self.is_hr_pass = False
        self.iteration = 0
        self.disable_extra_networks = False
        self.all_prompts = None
        self.all_negative_prompts = None
        self.all_seeds = None
        self.prompts = None
        self.negative_prompts = None
        self.seeds = None
        self.extra_network_data = None
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c
        self.c = None
        self.uc = None

    def setup_prompts(self):
        # A1111: a list prompt is one prompt per image; a list seed is one seed per image
        if isinstance(self.prompt, list):
            self.all_prompts = self.prompt
        else:
            self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
        if isinstance(self.seed, list):
            self.all_seeds = self.seed
        else:
            self.all_seeds = [self.seed + i for i in range(len(self.all_prompts))]

    def close(self):
        self.sampler = None
        self.c = None
        self.uc = None
        self.closed = True

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data):
        key = (tuple(required_prompts), steps, repr(extra_network_data))
        for cache in caches:
            if cache[0] is not None and cache[0] == key:
                return cache[1]
        cache = caches[0]
        cache[1] = function(shared.sd_model, required_prompts, steps)
        cache[0] = key
        return cache[1]

    def setup_conds(self):
        self.uc = self.get_conds_with_caching(
            prompt_parser.get_learned_conditioning,
            self.negative_prompts,
            self.steps,
            [self.cached_uc],
            self.extra_network_data,
        )
        self.c = self.get_conds_with_caching(
            prompt_parser.get_multicond_learned_conditioning,
            self.prompts,
            self.steps,
            [self.cached_c],
            self.extra_network_data,
        )


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    """A1111's txt2img processing (hires fix fields accepted, not used here)."""

    def __init__(self, enable_hr=False, denoising_strength=0.75, hr_scale=2.0, **kwargs):
        super().__init__(**kwargs)
        self.enable_hr = enable_hr
        self.denoising_strength = denoising_strength
        self.hr_scale = hr_scale


class CFGDenoiser(torch.nn.Module):
    """A1111's CFG denoiser, reduced to what matters here: reconstructs this step's conds (AND weights),
    repeats the latents per sub-prompt, one batched inner call for conds + uncond, ``combine_denoised``,
    fires ``cfg_denoiser_callback`` with ``denoiser=self``."""

    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.mask_before_denoising = False
        self.step = 0
        self.total_steps = None
        self.p = None
        self.cond_scale_miltiplier = 1.0

    @property
    def inner_model(self):
        if self.model_wrap is None:
            from k_diffusion.external import CompVisDenoiser

            self.model_wrap = CompVisDenoiser(shared.sd_model)
        return self.model_wrap

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if shared.state.interrupted or shared.state.skipped:
            raise sd_samplers_common.InterruptedException
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        repeats = [len(c) for c in conds_list]
        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat(
            [torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma]
        )
        image_cond_in = torch.cat(
            [torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [image_cond]
        )
        script_callbacks.cfg_denoiser_callback(
            script_callbacks.CFGDenoiserParams(
                x_in, image_cond_in, sigma_in, self.step, self.total_steps, tensor, uncond, self
            )
        )
        cond_in = torch.cat([tensor, uncond])
        x_out = self.inner_model(x_in, sigma_in, cond={"c_crossattn": [cond_in], "c_concat": [image_cond_in]})
        denoised_uncond = x_out[-uncond.shape[0] :]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        if self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        self.sampler.last_latent = denoised
        self.step += 1
        return denoised


class KDiffusionSampler:
    def __init__(self, sd_model):
        self.model_wrap_cfg = CFGDenoiser(self)
        self.last_latent = None

    def sample(self, p, x, conditioning, unconditional_conditioning, steps):
        from k_diffusion.sampling import get_sigmas_karras, sample_euler

        wrap = self.model_wrap_cfg.inner_model
        sigmas = get_sigmas_karras(steps, float(wrap.sigma_min), float(wrap.sigma_max), device=x.device)
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.total_steps = steps
        image_cond = x.new_zeros(x.shape[0], 5, 1, 1)
        extra = {
            "cond": conditioning,
            "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": 0.0,
            "image_cond": image_cond,
        }
        return sample_euler(self.model_wrap_cfg, x * sigmas[0], sigmas, extra_args=extra, disable=True)


class ScriptRunner:
    """Holds always-on scripts with their arg slices, calls hooks as ``modules.scripts.ScriptRunner``
    (exceptions in hooks are printed and swallowed, as the WebUI's ``wrap_call`` does)."""

    def __init__(self, scripts_with_args):
        self.items = list(scripts_with_args)

    def _each(self, name, p, *extra, **kwargs):
        for script, args in self.items:
            try:
                getattr(script, name)(p, *extra, *args, **kwargs)
            except Exception as e:
                print(f"Error running {name}: {type(e).__name__}: {e}")

    def process(self, p):
        self._each("process", p)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def postprocess_batch(self, p, images, **kwargs):
        self._each("postprocess_batch", p, images=images, **kwargs)

    def postprocess(self, p, processed):
        for script, args in self.items:
            try:
                script.postprocess(p, processed, *args)
            except Exception as e:
                print(f"Error running postprocess: {type(e).__name__}: {e}")


def process_images(p):
    shared.sd_model = p.sd_model
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    latents = []
    for n in range(p.n_iter):
        p.iteration = n
        sl = slice(n * p.batch_size, (n + 1) * p.batch_size)
        p.prompts = p.all_prompts[sl]
        p.negative_prompts = p.all_negative_prompts[sl]
        p.seeds = p.all_seeds[sl]
        p.prompts, p.extra_network_data = extra_networks.parse_prompts(p.prompts)
        if not p.disable_extra_networks:
            extra_networks.activate(p, p.extra_network_data)
        if p.scripts is not None:
            p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds)
        p.setup_conds()
        p.sampler = KDiffusionSampler(p.sd_model)
        gen = torch.Generator().manual_seed(p.seeds[0])
        c, h, w = p.sd_model.latent_shape
        x = torch.randn(p.batch_size, c, h, w, generator=gen)
        if p.scripts is not None:
            p.scripts.process_before_every_sampling(p=p, x=x, noise=x, c=p.c, uc=p.uc)
        samples = p.sampler.sample(p, x, p.c, p.uc, p.steps)
        latents.append(samples)
        if p.scripts is not None:
            p.scripts.postprocess_batch(p, samples, batch_number=n)
    extra_networks.deactivate(p, p.extra_network_data)
    processed = Processed(p, latents, [dict(p.extra_generation_params)])
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    return processed
