"""Pure tensor math of guided diffusion: schedules, forward process, DDPM/DDIM steps, guidance, sampling.

No Lightning, Hydra or W&B here: everything is testable with tensors alone.
"""

from .buckets import bucket_centres, timestep_buckets
from .guidance import (
    CFGDenoiser,
    cfg_combine,
    classifier_cond_fn,
    classifier_grad,
    condition_mean,
    condition_score,
)
from .process import (
    PREDICTION_TYPES,
    convert_prediction,
    min_snr_weight,
    q_posterior_mean_variance,
    q_sample,
    snr,
    training_target,
)
from .samplers import (
    DPM_ALGORITHMS,
    DPM_FINAL_SIGMAS,
    TIMESTEP_SPACINGS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    Sampler,
    make_timesteps,
)
from .sampling import make_generators, sample, seeded_noise
from .schedules import BETA_SCHEDULES, NoiseSchedule, extract, make_betas
from .variance import VARIANCE_TYPES, IDDPMSampler, hybrid_vlb_term, split_model_output

__all__ = [
    "BETA_SCHEDULES",
    "CFGDenoiser",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSampler",
    "DPM_ALGORITHMS",
    "DPM_FINAL_SIGMAS",
    "IDDPMSampler",
    "NoiseSchedule",
    "PREDICTION_TYPES",
    "Sampler",
    "TIMESTEP_SPACINGS",
    "VARIANCE_TYPES",
    "bucket_centres",
    "cfg_combine",
    "classifier_cond_fn",
    "classifier_grad",
    "condition_mean",
    "condition_score",
    "convert_prediction",
    "extract",
    "hybrid_vlb_term",
    "make_betas",
    "make_generators",
    "make_timesteps",
    "min_snr_weight",
    "q_posterior_mean_variance",
    "q_sample",
    "sample",
    "seeded_noise",
    "snr",
    "split_model_output",
    "timestep_buckets",
    "training_target",
]
