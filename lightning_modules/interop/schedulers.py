"""Our noise schedule and prediction type -> the constructor arguments of diffusers' DDIMScheduler and
DPMSolverMultistepScheduler (the ``scheduler/`` of an export). Pure: diffusers is not imported here."""

from __future__ import annotations

from typing import Any

from lightning_modules.diffusion.schedules import NoiseSchedule
from lightning_modules.interop.convert import UnsupportedByDiffusers

__all__ = ["PREDICTION_TO_DIFFUSERS", "SCHEDULE_TO_DIFFUSERS", "SCHEDULERS", "scheduler_config"]

PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULE_TO_DIFFUSERS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
# diffusers' squaredcos_cap_v2 hard-codes Nichol & Dhariwal's offset s.
DIFFUSERS_COSINE_S = 0.008
SCHEDULERS = ("ddim", "dpmpp_2m", "dpmpp_2m_sde")

def scheduler_config(
    schedule: NoiseSchedule, prediction_type: str, kind: str = "ddim", spacing: str = "leading"
) -> dict[str, Any]:
    """Constructor arguments of diffusers' DDIMScheduler (kind "ddim", eta at call time) or
    DPMSolverMultistepScheduler (kind "dpmpp_2m": DPM-Solver++(2M), midpoint, lower-order final step;
    "dpmpp_2m_sde": its SDE variant, algorithm_type "sde-dpmsolver++") for our training schedule and
    prediction type, stepping like our DDIMSampler / DPMSolverPP2MSampler.

    Our chains end at abar = 1 (set_alpha_to_one) with steps_offset 0. diffusers' DDIM steps from t to
    t - T // n, which is the next timestep of our chain for "leading" spacing (and for the others when n
    divides T); diffusers' DPM "leading" is another chain than ours, so the DPM kinds take "trailing" or
    "linspace" only.
    """
    if schedule.kind not in SCHEDULE_TO_DIFFUSERS:
        raise UnsupportedByDiffusers(f"schedule kind {schedule.kind!r} has no diffusers beta_schedule")
    if schedule.kind == "cosine" and abs(schedule.cosine_s - DIFFUSERS_COSINE_S) > 1e-12:
        raise UnsupportedByDiffusers(
            f"schedule cosine_s={schedule.cosine_s}: diffusers' squaredcos_cap_v2 fixes s = {DIFFUSERS_COSINE_S}"
        )
    if prediction_type not in PREDICTION_TO_DIFFUSERS:
        raise UnsupportedByDiffusers(f"prediction_type {prediction_type!r} has no diffusers equivalent")
    common = {
        "num_train_timesteps": int(schedule.num_timesteps),
        "beta_start": float(schedule.beta_start),
        "beta_end": float(schedule.beta_end),
        "beta_schedule": SCHEDULE_TO_DIFFUSERS[schedule.kind],
        "prediction_type": PREDICTION_TO_DIFFUSERS[prediction_type],
        "timestep_spacing": spacing,
        "steps_offset": 0,
        "thresholding": False,
    }
    if kind == "ddim":
        return {**common, "clip_sample": False, "set_alpha_to_one": True}
    if kind in ("dpmpp_2m", "dpmpp_2m_sde"):
        if spacing == "leading":
            raise UnsupportedByDiffusers(
                f"scheduler {kind} with spacing leading: diffusers' DPMSolverMultistepScheduler defines "
                "'leading' as another chain than ours; export it with spacing=trailing or linspace"
            )
        algorithm = "dpmsolver++" if kind == "dpmpp_2m" else "sde-dpmsolver++"
        return {**common, "algorithm_type": algorithm, "solver_order": 2, "solver_type": "midpoint",
                "lower_order_final": True, "final_sigmas_type": "zero", "use_karras_sigmas": False}  # fmt: skip
    raise UnsupportedByDiffusers(f"scheduler {kind!r}: expected one of {list(SCHEDULERS)}")
