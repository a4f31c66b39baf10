"""``modules.sd_samplers_common`` stand-in: the interrupt exception and the live-preview hook."""


class InterruptedException(BaseException):
    pass


stored_latents = []


def store_latent(decoded):
    stored_latents.append(decoded)
