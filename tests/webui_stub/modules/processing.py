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
        self.refiner_checkpoint_info = None
        self.refiner_switch_at = None
        self.s_min_uncond = 0.0
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

    def get_conds(self):
        return self.c, self.uc

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


def _cat_conds(conds):
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def _rows(cond, a, b):
    return {k: v[a:b] for k, v in cond.items()} if isinstance(cond, dict) else cond[a:b]


def _pad_text(text, repeats, empty):
    if isinstance(text, dict):
        text["crossattn"] = _pad_text(text["crossattn"], repeats, empty)
        return text
    return torch.cat([text, empty.repeat((text.shape[0], repeats, 1))], dim=1)


class CFGDenoiser(torch.nn.Module):
    """A1111 1.10.1's ``sd_samplers_cfg_denoiser.CFGDenoiser`` with ``CFGDenoiserKDiffusion.inner_model``
    (no InstructPix2Pix branch): interrupt check, refiner switch, this step's conds (AND parts), mask
    blending before or after (``on_mask_blend``), the repeated batch (cond rows per AND part, then uncond),
    ``cfg_denoiser_callback`` (its params read back), skip-early-CFG / NGMS, cond/uncond padding, the
    model calls (batched; per ``batch_size`` rows without ``batch_cond_uncond``; cond chunks then the
    uncond rows for unequal lengths), ``cfg_denoised_callback``, ``combine_denoised`` with AND weights and
    ``cond_scale_miltiplier``, ``last_latent``, ``store_latent``, ``cfg_after_cfg_callback``, ``step += 1``."""

    def __init__(self, sampler):
        super().__init__()
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.image_cfg_scale = None
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        self.sampler = sampler
        self.p = None
        self.cond_scale_miltiplier = 1.0
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None
        self.mask_before_denoising = False

    @property
    def inner_model(self):
        if self.model_wrap is None:
            from k_diffusion.external import CompVisDenoiser

            self.model_wrap = CompVisDenoiser(shared.sd_model)
        return self.model_wrap

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0] :]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def get_pred_x0(self, x_in, x_out, sigma):
        return x_out

    def update_inner_model(self):
        self.model_wrap = None
        c, uc = self.p.get_conds()
        self.sampler.sampler_extra_args["cond"] = c
        self.sampler.sampler_extra_args["uncond"] = uc

    def pad_cond_uncond(self, cond, uncond):
        empty = shared.sd_model.cond_stage_model_empty_prompt
        num_repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
        if num_repeats < 0:
            cond = _pad_text(cond, -num_repeats, empty)
            self.padded_cond_uncond = True
        elif num_repeats > 0:
            uncond = _pad_text(uncond, num_repeats, empty)
            self.padded_cond_uncond = True
        return cond, uncond

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        opts, state = shared.opts, shared.state
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        if sd_samplers_common.apply_refiner(self, sigma):
            cond = self.sampler.sampler_extra_args["cond"]
            uncond = self.sampler.sampler_extra_args["uncond"]
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)

        def apply_blend(current_latent):
            blended = current_latent * self.nmask + self.init_latent * self.mask
            if self.p.scripts is not None:
                from modules import scripts

                mba = scripts.MaskBlendArgs(
                    current_latent,
                    self.nmask,
                    self.init_latent,
                    self.mask,
                    blended,
                    denoiser=self,
                    sigma=sigma,
                )
                self.p.scripts.on_mask_blend(self.p, mba)
                blended = mba.blended_latent
            return blended

        if self.mask_before_denoising and self.mask is not None:
            x = apply_blend(x)
        batch_size = len(conds_list)
        repeats = [len(conds_list[i]) for i in range(batch_size)]
        if isinstance(uncond, dict):

            def make_condition_dict(c_crossattn, c_concat):
                return {**c_crossattn, "c_concat": [c_concat]}
        else:

            def make_condition_dict(c_crossattn, c_concat):
                return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}

        def repeated(t, tail):
            return torch.cat([torch.stack([t[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [tail])

        x_in, sigma_in, image_cond_in = (
            repeated(x, x),
            repeated(sigma, sigma),
            repeated(image_cond, image_cond),
        )
        params = script_callbacks.CFGDenoiserParams(
            x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond, self
        )
        script_callbacks.cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond
        skip_uncond = False
        if opts.skip_early_cond != 0.0 and self.step / self.total_steps <= opts.skip_early_cond:
            skip_uncond = True
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
        elif (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True
            self.p.extra_generation_params["NGMS"] = s_min_uncond
        if skip_uncond:
            x_in = x_in[:-batch_size]
            sigma_in = sigma_in[:-batch_size]
        self.padded_cond_uncond = False
        if opts.pad_cond_uncond and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond(tensor, uncond)

        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else _cat_conds([tensor, uncond])
            if opts.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(
                        x_in[a:b],
                        sigma_in[a:b],
                        cond=make_condition_dict(_rows(cond_in, a, b), image_cond_in[a:b]),
                    )
        else:
            x_out = torch.zeros_like(x_in)
            chunk = batch_size * 2 if opts.batch_cond_uncond else batch_size
            for a in range(0, tensor.shape[0], chunk):
                b = min(a + chunk, tensor.shape[0])
                x_out[a:b] = self.inner_model(
                    x_in[a:b],
                    sigma_in[a:b],
                    cond=make_condition_dict(_rows(tensor, a, b), image_cond_in[a:b]),
                )
            if not skip_uncond:
                n = uncond.shape[0]
                x_out[-n:] = self.inner_model(
                    x_in[-n:], sigma_in[-n:], cond=make_condition_dict(uncond, image_cond_in[-n:])
                )

        denoised_image_indexes = [c[0][0] for c in conds_list]
        if skip_uncond:
            x_out = torch.cat([x_out, torch.cat([x_out[i : i + 1] for i in denoised_image_indexes])])
        script_callbacks.cfg_denoised_callback(
            script_callbacks.CFGDenoisedParams(
                x_out, state.sampling_step, state.sampling_steps, self.inner_model
            )
        )
        if self.need_last_noise_uncond:
            self.last_noise_uncond = torch.clone(x_out[-uncond.shape[0] :])
        scale = 1.0 if skip_uncond else cond_scale * self.cond_scale_miltiplier
        denoised = self.combine_denoised(x_out, conds_list, uncond, scale)
        if not self.mask_before_denoising and self.mask is not None:
            denoised = apply_blend(denoised)
        first = denoised_image_indexes
        self.sampler.last_latent = self.get_pred_x0(
            torch.cat([x_in[i : i + 1] for i in first]), torch.cat([x_out[i : i + 1] for i in first]), sigma
        )
        sd_samplers_common.store_latent(self.sampler.last_latent)
        after = script_callbacks.AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        script_callbacks.cfg_after_cfg_callback(after)
        denoised = after.x
        self.step += 1
        return denoised


class KDiffusionSampler:
    """A1111's ``KDiffusionSampler`` reduced to Euler on Karras sigmas: the CFG denoiser and its k-diffusion
    wrapper made at construction, ``sampler_extra_args``, ``state.sampling_step`` per step."""

    def __init__(self, sd_model):
        self.model_wrap_cfg = CFGDenoiser(self)
        self.model_wrap = self.model_wrap_cfg.inner_model
        self.last_latent = None
        self.sampler_extra_args = {}

    def sample(self, p, x, conditioning, unconditional_conditioning, steps, image_conditioning=None):
        from k_diffusion.sampling import get_sigmas_karras, sample_euler

        wrap = self.model_wrap
        sigmas = get_sigmas_karras(steps, float(wrap.sigma_min), float(wrap.sigma_max), device=x.device)
        cfg = self.model_wrap_cfg
        cfg.p = p
        cfg.steps = steps
        cfg.total_steps = steps
        cfg.step = 0
        cfg.mask = getattr(p, "mask", None)
        cfg.nmask = getattr(p, "nmask", None)
        cfg.init_latent = getattr(p, "init_latent", None)
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        if image_conditioning is None:
            image_conditioning = x.new_zeros(x.shape[0], 5, 1, 1)
        self.sampler_extra_args = {
            "cond": conditioning,
            "image_cond": image_conditioning,
            "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": getattr(p, "s_min_uncond", 0.0),
        }

        def callback_state(d):
            shared.state.sampling_step = d["i"]

        return sample_euler(
            cfg,
            x * sigmas[0],
            sigmas,
            extra_args=self.sampler_extra_args,
            disable=True,
            callback=callback_state,
        )


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

    def on_mask_blend(self, p, mba):
        for script, args in self.items:
            try:
                script.on_mask_blend(p, mba, *args)
            except Exception as e:
                print(f"Error running on_mask_blend: {type(e).__name__}: {e}")

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
