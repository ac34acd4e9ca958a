// PNDMScheduler of diffusers 0.42.1 (schedulers/scheduling_pndm.py) with skip_prk_steps: true, i.e. PLMS, the
// default of many SD 1.x folders. Supports timestep_spacing leading / trailing / linspace, steps_offset,
// set_alpha_to_one, prediction_type epsilon / v_prediction. Refuses skip_prk_steps: false (the Runge-Kutta warm-up).

import { alphasCumprodFromConfig, pickConfig, refuse, spacedTimesteps, SCHEDULE_DEFAULTS } from "./schedule.js";

/** PNDMScheduler.__init__'s defaults: what from_config gives the keys a folder's config lacks. */
export const DEFAULTS = {
  ...SCHEDULE_DEFAULTS,
  skip_prk_steps: false,
  set_alpha_to_one: false,
  prediction_type: "epsilon",
  timestep_spacing: "leading",
  steps_offset: 0,
};

export class PNDMScheduler {
  /** @param {object} config a scheduler_config.json object; unknown keys are ignored, missing ones take defaults */
  constructor(config = {}) {
    const c = (this.config = pickConfig(DEFAULTS, config));
    refuse(!c.skip_prk_steps, "PNDMScheduler: skip_prk_steps false (PRK warm-up) is not supported by this port: "
      + "use skip_prk_steps: true");
    refuse(!["epsilon", "v_prediction"].includes(c.prediction_type),
      `PNDMScheduler: prediction_type ${c.prediction_type} is not supported: use epsilon or v_prediction`);
    // PNDMScheduler has no rescale_betas_zero_snr: pickConfig drops it, as from_config does
    this.alphasCumprod = alphasCumprodFromConfig(c);
    this.finalAlphaCumprod = c.set_alpha_to_one ? 1 : this.alphasCumprod[0];
    this.initNoiseSigma = 1;
    this.timesteps = [];
  }

  /** Spaces the timesteps; PLMS repeats the second one (its first step is a two-evaluation warm-up). */
  setTimesteps(numInferenceSteps) {
    this.numInferenceSteps = numInferenceSteps;
    const ts = spacedTimesteps(this.config, numInferenceSteps).reverse(); // ascending, as diffusers' _timesteps
    this.timesteps = [...ts.slice(0, -1), ...ts.slice(-2, -1), ...ts.slice(-1)].reverse();
    this.ets = [];
    this.counter = 0;
    this.curSample = null;
  }

  /** PNDM needs no input scaling: returns `sample` itself. */
  scaleModelInput(sample) {
    return sample;
  }

  /** One PLMS (linear multistep) step from timestep `t`; returns the new sample. */
  step(modelOutput, t, sample) {
    const ratio = Math.floor(this.config.num_train_timesteps / this.numInferenceSteps);
    let [timestep, prev] = [t, t - ratio];
    if (this.counter !== 1) this.ets = [...this.ets.slice(-3), Float32Array.from(modelOutput)]; // a copy: kept 4 steps
    else [timestep, prev] = [t + ratio, t];
    const e = this.ets;
    let eps;
    if (e.length === 1 && this.counter === 0) {
      eps = modelOutput;
      this.curSample = Float32Array.from(sample);
    } else if (e.length === 1 && this.counter === 1) {
      eps = modelOutput.map((m, i) => (m + e[0][i]) / 2);
      sample = this.curSample;
      this.curSample = null;
    } else if (e.length === 2) eps = e[1].map((m, i) => (3 * m - e[0][i]) / 2);
    else if (e.length === 3) eps = e[2].map((m, i) => (23 * m - 16 * e[1][i] + 5 * e[0][i]) / 12);
    else eps = e[3].map((m, i) => (1 / 24) * (55 * m - 59 * e[2][i] + 37 * e[1][i] - 9 * e[0][i]));
    this.counter += 1;
    return this._prevSample(sample, timestep, prev, eps);
  }

  _prevSample(sample, t, prev, modelOutput) {
    const alpha = this.alphasCumprod[t];
    const alphaPrev = prev >= 0 ? this.alphasCumprod[prev] : this.finalAlphaCumprod;
    const [beta, betaPrev] = [1 - alpha, 1 - alphaPrev];
    const sampleCoeff = Math.sqrt(alphaPrev / alpha);
    const denom = alpha * Math.sqrt(betaPrev) + Math.sqrt(alpha * beta * alphaPrev);
    const v = this.config.prediction_type === "v_prediction";
    const out = new Float32Array(sample.length);
    for (let i = 0; i < sample.length; i++) {
      const eps = v ? Math.sqrt(alpha) * modelOutput[i] + Math.sqrt(beta) * sample[i] : modelOutput[i];
      out[i] = sampleCoeff * sample[i] - ((alphaPrev - alpha) * eps) / denom;
    }
    return out;
  }
}
