// EulerDiscreteScheduler of diffusers 0.42.1 (schedulers/scheduling_euler_discrete.py), deterministic (s_churn = 0,
// what the pipelines use). Supports timestep_spacing linspace / leading / trailing, steps_offset, prediction_type
// epsilon / v_prediction / sample, rescale_betas_zero_snr. Refuses karras / exponential / beta sigmas,
// interpolation_type other than "linear", final_sigmas_type other than "zero", and continuous v-prediction timesteps.

import {
  alphasCumprodFromConfig, f32, interp, pickConfig, refuse, spacedTimesteps, trainSigmas, SCHEDULE_DEFAULTS,
} from "./schedule.js";

/** EulerDiscreteScheduler.__init__'s defaults: what from_config gives the keys a folder's config lacks. */
export const DEFAULTS = {
  ...SCHEDULE_DEFAULTS,
  prediction_type: "epsilon",
  interpolation_type: "linear",
  use_karras_sigmas: false,
  use_exponential_sigmas: false,
  use_beta_sigmas: false,
  sigma_min: null,
  sigma_max: null,
  timestep_spacing: "linspace",
  timestep_type: "discrete",
  steps_offset: 0,
  rescale_betas_zero_snr: false,
  final_sigmas_type: "zero",
};

const PREDICTIONS = ["epsilon", "v_prediction", "sample", "original_sample"];

export class EulerDiscreteScheduler {
  /** @param {object} config a scheduler_config.json object; unknown keys are ignored, missing ones take defaults */
  constructor(config = {}) {
    const c = (this.config = pickConfig(DEFAULTS, config));
    for (const key of ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"]) {
      refuse(c[key], `EulerDiscreteScheduler: ${key} is not supported by this port (linear sigmas only)`);
    }
    refuse(c.interpolation_type !== "linear",
      `EulerDiscreteScheduler: interpolation_type ${c.interpolation_type} is not supported: use linear`);
    refuse(c.final_sigmas_type !== "zero",
      `EulerDiscreteScheduler: final_sigmas_type ${c.final_sigmas_type} is not supported: use zero`);
    refuse(c.timestep_type === "continuous" && c.prediction_type === "v_prediction",
      "EulerDiscreteScheduler: timestep_type continuous is not supported: use discrete");
    refuse(!PREDICTIONS.includes(c.prediction_type),
      `EulerDiscreteScheduler: prediction_type ${c.prediction_type} is not supported: use ${PREDICTIONS.join(", ")}`);
    const alphasCumprod = alphasCumprodFromConfig(c);
    if (c.rescale_betas_zero_snr) alphasCumprod[alphasCumprod.length - 1] = 2 ** -24;
    this.trainSigmas = trainSigmas(alphasCumprod);
    this.timesteps = [];
    this.sigmas = [...this.trainSigmas].reverse().concat([0]);
  }

  /** diffusers' init_noise_sigma: the largest sigma, or sqrt(sigma^2 + 1) for "leading" spacing (float32). */
  get initNoiseSigma() {
    const max = Math.max(...this.sigmas);
    const spacing = this.config.timestep_spacing;
    return spacing === "linspace" || spacing === "trailing" ? max : f32(Math.sqrt(f32(f32(max * max) + 1)));
  }

  /** Spaces `numInferenceSteps` timesteps (float32 values, descending) and their sigmas (linear interpolation). */
  setTimesteps(numInferenceSteps) {
    this.timesteps = spacedTimesteps(this.config, numInferenceSteps, false).map(f32);
    this.sigmas = this.timesteps.map((t) => f32(interp(t, this.trainSigmas))).concat([0]);
    this.stepIndex = null;
  }

  _initStepIndex(t) {
    if (this.stepIndex != null) return;
    const matches = this.timesteps.flatMap((v, i) => (v === t ? [i] : []));
    refuse(matches.length === 0, `EulerDiscreteScheduler: timestep ${t} is not one of the scheduler's timesteps`);
    this.stepIndex = matches[matches.length > 1 ? 1 : 0];
  }

  /** Divides `sample` by sqrt(sigma^2 + 1) for the current step (float32, as diffusers). */
  scaleModelInput(sample, t) {
    this._initStepIndex(t);
    const sigma = this.sigmas[this.stepIndex];
    const scale = f32(Math.sqrt(f32(f32(sigma * sigma) + 1)));
    return sample.map((x) => x / scale);
  }

  /** One Euler step from timestep `t` to the next sigma; returns the new sample. */
  step(modelOutput, t, sample) {
    this._initStepIndex(t);
    refuse(this.stepIndex >= this.timesteps.length, "EulerDiscreteScheduler: step called after the last timestep");
    const sigma = this.sigmas[this.stepIndex];
    const dt = this.sigmas[this.stepIndex + 1] - sigma;
    const prediction = this.config.prediction_type;
    const out = new Float32Array(sample.length);
    for (let i = 0; i < sample.length; i++) {
      const [x, m] = [sample[i], modelOutput[i]];
      let x0;
      if (prediction === "epsilon") x0 = x - sigma * m;
      else if (prediction === "v_prediction") x0 = m * (-sigma / Math.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1);
      else x0 = m;
      out[i] = x + ((x - x0) / sigma) * dt;
    }
    this.stepIndex += 1;
    return out;
  }
}
