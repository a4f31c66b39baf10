"""``modules.sd_samplers_common`` stand-in: the interrupt exception, the live-preview hook and the refiner
switch (A1111 1.10: at the switch the model is replaced, the conds are made again and the CFG denoiser's
k-diffusion wrapper is dropped, so a new one is built for the refiner)."""

from modules import shared


class InterruptedException(BaseException):
    pass


stored_latents = []


def store_latent(decoded):
    stored_latents.append(decoded)


def apply_refiner(cfg_denoiser, sigma=None):
    """Switch by sampling steps only (``refiner_checkpoint_info`` is the refiner model object here)."""
    p = cfg_denoiser.p
    refiner = getattr(p, "refiner_checkpoint_info", None)
    switch_at = getattr(p, "refiner_switch_at", None)
    if refiner is None or shared.sd_model is refiner:
        return False
    if switch_at is not None and cfg_denoiser.step / cfg_denoiser.total_steps < switch_at:
        return False
    shared.sd_model = refiner
    p.sd_model = refiner
    p.setup_conds()
    cfg_denoiser.update_inner_model()
    return True
