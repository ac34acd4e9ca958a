// DPMSolverMultistepScheduler of diffusers 0.42.1 (schedulers/scheduling_dpmsolver_multistep.py): DPM-Solver++ (2M
// or 1), midpoint, final sigma zero. Supports timestep_spacing linspace / leading / trailing, steps_offset,
// use_karras_sigmas, lower_order_final, lambda_min_clipped, prediction_type epsilon / v_prediction,
// rescale_betas_zero_snr. Refuses the SDE / non-++ algorithms, solver_order 3, solver_type heun, thresholding,
// exponential / beta / lu / flow sigmas, final_sigmas_type sigma_min and learned variance outputs.

import {
  alphasCumprodFromConfig, arange, f32, interp, linspace, pickConfig, refuse, roundHalfEven, trainSigmas,
  SCHEDULE_DEFAULTS,
} from "./schedule.js";

/** DPMSolverMultistepScheduler.__init__'s defaults: what from_config gives the keys a folder's config lacks. */
export const DEFAULTS = {
  ...SCHEDULE_DEFAULTS,
  solver_order: 2, prediction_type: "epsilon", thresholding: false, dynamic_thresholding_ratio: 0.995,
  sample_max_value: 1.0, algorithm_type: "dpmsolver++", solver_type: "midpoint", lower_order_final: true,
  euler_at_final: false, use_karras_sigmas: false, use_exponential_sigmas: false, use_beta_sigmas: false,
  use_lu_lambdas: false, use_flow_sigmas: false, flow_shift: 1.0, final_sigmas_type: "zero",
  lambda_min_clipped: -Infinity, variance_type: null, timestep_spacing: "linspace", steps_offset: 0,
  rescale_betas_zero_snr: false, use_dynamic_shifting: false, time_shift_type: "exponential",
};

const SUPPORTED = "algorithm_type dpmsolver++, solver_order 1 or 2, solver_type midpoint, final_sigmas_type zero";

export class DPMSolverMultistepScheduler {
  /** @param {object} config a scheduler_config.json object; unknown keys are ignored, missing ones take defaults */
  constructor(config = {}) {
    const c = (this.config = pickConfig(DEFAULTS, config));
    if (c.algorithm_type === "deis") c.algorithm_type = "dpmsolver++"; // diffusers re-registers these, too
    if (["logrho", "bh1", "bh2"].includes(c.solver_type)) c.solver_type = "midpoint";
    const why = (key, value) => `DPMSolverMultistepScheduler: ${key} ${value} is not supported by this port (${SUPPORTED})`;
    refuse(c.algorithm_type !== "dpmsolver++", why("algorithm_type", c.algorithm_type));
    refuse(![1, 2].includes(c.solver_order), why("solver_order", c.solver_order));
    refuse(c.solver_type !== "midpoint", why("solver_type", c.solver_type));
    refuse(c.final_sigmas_type !== "zero", why("final_sigmas_type", c.final_sigmas_type));
    refuse(!["epsilon", "v_prediction"].includes(c.prediction_type),
      `DPMSolverMultistepScheduler: prediction_type ${c.prediction_type} is not supported: use epsilon or v_prediction`);
    for (const key of ["thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"]) {
      refuse(c[key], why(key, true));
    }
    refuse(c.variance_type != null, why("variance_type", c.variance_type));
    const alphasCumprod = alphasCumprodFromConfig(c);
    if (c.rescale_betas_zero_snr) alphasCumprod[alphasCumprod.length - 1] = 2 ** -24;
    this.alphasCumprod = alphasCumprod;
    this.trainSigmas = trainSigmas(alphasCumprod);
    this.initNoiseSigma = 1;
    this.timesteps = [];
  }

  /** Spaces `numInferenceSteps` integer timesteps (descending) and their sigmas, linear or Karras. */
  setTimesteps(numInferenceSteps) {
    const c = this.config;
    const n = numInferenceSteps;
    const T = c.num_train_timesteps;
    // searchsorted(flip(lambda_t), lambda_min_clipped): how many training steps lie below the clip, from the end
    const lambda = (a) => f32(f32(Math.log(f32(Math.sqrt(a)))) - f32(Math.log(f32(Math.sqrt(f32(1 - a))))));
    const clip = c.lambda_min_clipped ?? -Infinity; // Python writes -inf as -Infinity, which JSON.parse refuses
    const clipped = this.alphasCumprod.filter((a) => lambda(a) < clip).length;
    const last = T - clipped;
    let ts;
    if (c.timestep_spacing === "linspace") ts = linspace(0, last - 1, n + 1).map(roundHalfEven).reverse().slice(0, -1);
    else if (c.timestep_spacing === "leading") {
      const ratio = Math.floor(last / (n + 1));
      ts = Array.from({ length: n }, (_, i) => (n - i) * ratio + c.steps_offset);
    } else if (c.timestep_spacing === "trailing") ts = arange(last, 0, -T / n).map((t) => roundHalfEven(t) - 1);
    else throw new Error(`timestep_spacing ${c.timestep_spacing} is not supported: use leading, trailing or linspace`);
    let sigmas;
    if (c.use_karras_sigmas) {
      sigmas = this._karras(n);
      ts = sigmas.map((s) => this._sigmaToT(s));
      if (c.beta_schedule !== "squaredcos_cap_v2") ts = ts.map(roundHalfEven);
    } else {
      sigmas = ts.map((t) => interp(t, this.trainSigmas));
    }
    this.sigmas = sigmas.map(f32).concat([0]);
    this.timesteps = ts.map(Math.trunc); // .to(torch.int64)
    this.modelOutputs = new Array(c.solver_order).fill(null);
    this.lowerOrderNums = 0;
    this.stepIndex = null;
  }

  // _convert_to_karras: sigma_min / sigma_max are the training ones (from_config never carries Euler's sigma_min over)
  _karras(n, rho = 7.0) {
    const [sigmaMin, sigmaMax] = [this.trainSigmas[0], this.trainSigmas[this.trainSigmas.length - 1]];
    const [minInv, maxInv] = [sigmaMin ** (1 / rho), sigmaMax ** (1 / rho)];
    return linspace(0, 1, n).map((r) => (maxInv + r * (minInv - maxInv)) ** rho);
  }

  // _sigma_to_t: interpolates log sigma between the training steps around it; diffusers' log sigmas are float32
  _sigmaToT(sigma) {
    const logSigmas = (this._logSigmas ??= this.trainSigmas.map((s) => f32(Math.log(s))));
    const logSigma = Math.log(Math.max(sigma, 1e-10));
    let low = 0; // the last step whose log sigma is <= logSigma (numpy: argmax of a cumulative count)
    logSigmas.forEach((l, i) => { if (logSigma >= l) low = i; });
    low = Math.min(low, logSigmas.length - 2);
    const w = (logSigmas[low] - logSigma) / f32(logSigmas[low] - logSigmas[low + 1]);
    const clipped = Math.min(Math.max(w, 0), 1);
    return (1 - clipped) * low + clipped * (low + 1);
  }

  _alphaSigma(sigma) {
    const alpha = 1 / Math.sqrt(sigma * sigma + 1);
    return [alpha, sigma * alpha, Math.log(alpha) - Math.log(sigma * alpha)];
  }

  /** The pipelines' model input needs no scaling: returns `sample` itself. */
  scaleModelInput(sample) {
    return sample;
  }

  /** One multistep DPM-Solver++ step from timestep `t`; returns the new sample. */
  step(modelOutput, t, sample) {
    const c = this.config;
    const count = this.timesteps.length;
    if (this.stepIndex == null) {
      const matches = this.timesteps.flatMap((v, i) => (v === t ? [i] : []));
      this.stepIndex = matches.length === 0 ? count - 1 : matches[matches.length > 1 ? 1 : 0];
    }
    const i = this.stepIndex;
    // diffusers starts at the second of repeated timesteps (Karras on squaredcos_cap_v2 repeats them) and overruns
    refuse(i >= count, "DPMSolverMultistepScheduler: step called after the last timestep");
    const lowerOrderFinal = i === count - 1; // always true with final_sigmas_type "zero"
    // convert_model_output: the data prediction x0
    const [alphaS0, sigmaS0, lambdaS0] = this._alphaSigma(this.sigmas[i]);
    const x0 = new Float32Array(sample.length);
    for (let k = 0; k < sample.length; k++) {
      x0[k] = c.prediction_type === "epsilon"
        ? (sample[k] - sigmaS0 * modelOutput[k]) / alphaS0
        : alphaS0 * sample[k] - sigmaS0 * modelOutput[k];
    }
    this.modelOutputs = [...this.modelOutputs.slice(1), x0];
    const [alphaT, sigmaT, lambdaT] = this._alphaSigma(this.sigmas[i + 1]);
    const h = lambdaT - lambdaS0;
    const ratio = sigmaT / sigmaS0;
    const coeff = alphaT * (Math.exp(-h) - 1);
    const out = new Float32Array(sample.length);
    if (c.solver_order === 1 || this.lowerOrderNums < 1 || lowerOrderFinal) {
      for (let k = 0; k < sample.length; k++) out[k] = ratio * sample[k] - coeff * x0[k];
    } else {
      const m1 = this.modelOutputs[this.modelOutputs.length - 2];
      const lambdaS1 = this._alphaSigma(this.sigmas[i - 1])[2];
      const r0 = (lambdaS0 - lambdaS1) / h;
      for (let k = 0; k < sample.length; k++) {
        const d1 = (1 / r0) * (x0[k] - m1[k]);
        out[k] = ratio * sample[k] - coeff * x0[k] - 0.5 * coeff * d1;
      }
    }
    if (this.lowerOrderNums < c.solver_order) this.lowerOrderNums += 1;
    this.stepIndex += 1;
    return out;
  }
}
