// DDIMScheduler of diffusers 0.42.1 (schedulers/scheduling_ddim.py), deterministic (eta = 0, what the pipelines use).
// Supports timestep_spacing leading / trailing / linspace, steps_offset, set_alpha_to_one, prediction_type epsilon /
// v_prediction / sample, clip_sample, rescale_betas_zero_snr. Refuses thresholding.

import { alphasCumprodFromConfig, pickConfig, refuse, spacedTimesteps, SCHEDULE_DEFAULTS } from "./schedule.js";

/** DDIMScheduler.__init__'s defaults: what from_config gives the keys a folder's config lacks. */
export const DEFAULTS = {
  ...SCHEDULE_DEFAULTS,
  clip_sample: true,
  set_alpha_to_one: true,
  steps_offset: 0,
  prediction_type: "epsilon",
  thresholding: false,
  dynamic_thresholding_ratio: 0.995,
  clip_sample_range: 1.0,
  sample_max_value: 1.0,
  timestep_spacing: "leading",
  rescale_betas_zero_snr: false,
};

const PREDICTIONS = ["epsilon", "v_prediction", "sample"];

export class DDIMScheduler {
  /** @param {object} config a scheduler_config.json object; unknown keys are ignored, missing ones take defaults */
  constructor(config = {}) {
    const c = (this.config = pickConfig(DEFAULTS, config));
    refuse(c.thresholding, "DDIMScheduler: thresholding is not supported by this port (use thresholding: false)");
    refuse(!PREDICTIONS.includes(c.prediction_type),
      `DDIMScheduler: prediction_type ${c.prediction_type} is not supported: use ${PREDICTIONS.join(", ")}`);
    this.alphasCumprod = alphasCumprodFromConfig(c);
    this.finalAlphaCumprod = c.set_alpha_to_one ? 1 : this.alphasCumprod[0];
    this.initNoiseSigma = 1;
    this.timesteps = [];
  }

  /** Spaces `numInferenceSteps` timesteps over the training schedule (integers, descending). */
  setTimesteps(numInferenceSteps) {
    const T = this.config.num_train_timesteps;
    refuse(numInferenceSteps > T, `DDIMScheduler: numInferenceSteps ${numInferenceSteps} is larger than ${T}`);
    this.numInferenceSteps = numInferenceSteps;
    this.timesteps = spacedTimesteps(this.config, numInferenceSteps);
  }

  /** DDIM needs no input scaling: returns `sample` itself. */
  scaleModelInput(sample) {
    return sample;
  }

  /** One DDIM step (eta = 0) from timestep `t` to the previous one; returns the new sample. */
  step(modelOutput, t, sample) {
    const c = this.config;
    // diffusers steps back by T // n whatever the spacing (so "trailing" and "linspace" may not land on the next t)
    const prev = t - Math.floor(c.num_train_timesteps / this.numInferenceSteps);
    const alpha = this.alphasCumprod[t];
    const alphaPrev = prev >= 0 ? this.alphasCumprod[prev] : this.finalAlphaCumprod;
    const [a, b] = [Math.sqrt(alpha), Math.sqrt(1 - alpha)];
    const aPrev = Math.sqrt(alphaPrev);
    const direction = Math.sqrt(1 - alphaPrev);
    const range = c.clip_sample_range;
    const out = new Float32Array(sample.length);
    for (let i = 0; i < sample.length; i++) {
      const [x, m] = [sample[i], modelOutput[i]];
      let x0, eps;
      if (c.prediction_type === "epsilon") [x0, eps] = [(x - b * m) / a, m];
      else if (c.prediction_type === "v_prediction") [x0, eps] = [a * x - b * m, a * m + b * x];
      else [x0, eps] = [m, (x - a * m) / b];
      if (c.clip_sample) x0 = Math.min(Math.max(x0, -range), range);
      out[i] = aPrev * x0 + direction * eps;
    }
    return out;
  }
}
